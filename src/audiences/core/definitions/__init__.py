"""Definitions: validation (JSON-path errors), compilation and the catalog."""

from audiences.core.definitions.catalog import (
    Catalog,
    CompiledAudience,
    build_catalog,
    compile_definition,
)
from audiences.core.definitions.validate import check_references, validate_definition

__all__ = [
    "Catalog",
    "CompiledAudience",
    "build_catalog",
    "check_references",
    "compile_definition",
    "validate_definition",
]
