"""Which `audiences.core` runs: the mypyc-compiled extension modules or the pure sources.

`setup.py` compiles `audiences.core` with mypyc when it can, and with it the runtime's
per-event path (`COMPILED_ADAPTERS`: the partition state, its history, the emitter and
the batch evaluation), and writes a build record (`core/_build.json`) next to the
compiled modules: the kind, why not compiled, the extension suffix and a digest of the
sources as compiled. "The core" below means all of them: they are compiled, found stale
and run pure together. At import, `audiences`
calls `select_core` once, before any module of the core is imported:

- ``AUDIENCES_PURE_CORE=1``, no record, a record of a pure build, modules compiled for
  another interpreter, or a source digest that differs from the record's (the sources were
  edited since the build: the compiled core is *stale*) -> pure Python, and a meta-path
  finder loads the `.py` sources of `audiences.core.*` (the import system would otherwise
  prefer an extension module next to them). A stale build is logged once, with how to
  rebuild.
- otherwise the compiled modules run.

Standard library only, nothing from `audiences`: `setup.py` loads this file by path to
compute the same digest.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.abc import MetaPathFinder
from pathlib import Path
from types import ModuleType

PURE_ENV = "AUDIENCES_PURE_CORE"
RECORD = "_build.json"
PACKAGE = "audiences.core"
REBUILD = "`make core` (or `python setup.py build_ext --inplace`)"

# The runtime's per-event path, compiled with the core (paths under the package). They stay
# adapters (they do I/O); they are compiled in the core's group, so they call it natively
# (tests patch the seams they keep for that: `partition.step_override`,
# `partition.encode_override`, `evaluation.parse_override`).
COMPILED_ADAPTERS = (
    "adapters/state/history.py",
    "adapters/state/partition.py",
    "adapters/stream/emitter.py",
    "adapters/stream/evaluation.py",
)

log = logging.getLogger("audiences.core_build")


@dataclass(frozen=True)
class CoreBuild:
    kind: str  # "compiled" | "pure"
    reason: str  # why pure ("" when compiled)
    toolchain: bool = False  # the build found a C compiler, Python headers and mypyc
    stale: bool = False  # compiled, but the sources changed since: not used

    @property
    def compiled(self) -> bool:
        return self.kind == "compiled"

    def describe(self) -> str:
        return "compiled with mypyc" if self.compiled else f"pure Python — {self.reason}"


def adapter_sources(core_dir: Path) -> list[Path]:
    """The `COMPILED_ADAPTERS` next to `core_dir` (none in a copy of the core alone)."""
    package = core_dir.parent
    return [package / name for name in COMPILED_ADAPTERS if (package / name).is_file()]


def source_digest(core_dir: Path) -> str:
    """sha256 over the core's `.py` files and the compiled adapters (path relative to the
    package and content, core first, each in path order)."""
    digest = hashlib.sha256()
    core = sorted(core_dir.rglob("*.py"), key=lambda p: p.relative_to(core_dir).as_posix())
    for path in [*core, *adapter_sources(core_dir)]:
        digest.update(path.relative_to(core_dir.parent).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def module_names(core_dir: Path) -> list[str]:
    """The modules that are compiled: all of the core but the packages' `__init__` (a
    compiled package would import mypyc's shared library from inside itself while
    initialising), then the compiled adapters."""
    core = [path for path in sorted(core_dir.rglob("*.py")) if path.name != "__init__.py"]
    return [_module_name(core_dir.parent, path) for path in [*core, *adapter_sources(core_dir)]]


def _module_name(package_dir: Path, path: Path) -> str:
    return ".".join(("audiences", *path.relative_to(package_dir).with_suffix("").parts))


def extension_path(core_dir: Path, module: str, suffix: str) -> Path:
    *packages, name = module.split(".")[1:]
    return core_dir.parent.joinpath(*packages, name + suffix)


_ADAPTER_MODULES = frozenset(
    "audiences." + name.removesuffix(".py").replace("/", ".") for name in COMPILED_ADAPTERS
)


def decide(core_dir: Path, environ: Mapping[str, str]) -> CoreBuild:
    """Which core to run (no side effects)."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return CoreBuild("pure", f"{PURE_ENV}={environ[PURE_ENV]}")
    try:
        record = json.loads((core_dir / RECORD).read_text())
    except FileNotFoundError:
        return CoreBuild("pure", "not compiled (no build record)")
    except (OSError, ValueError) as exc:
        return CoreBuild("pure", f"unreadable build record {RECORD}: {exc}")
    toolchain = bool(record.get("toolchain"))
    if record.get("kind") != "compiled":
        return CoreBuild("pure", str(record.get("reason") or "not compiled"), toolchain)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if record.get("ext_suffix") != suffix or not all(
        extension_path(core_dir, module, suffix).is_file() for module in record["modules"]
    ):
        return CoreBuild(
            "pure", f"compiled for another Python ({record.get('ext_suffix')})", toolchain
        )
    if record.get("sources_sha256") != source_digest(core_dir):
        return CoreBuild(
            "pure",
            f"the compiled core is stale (sources edited since the build); rebuild with {REBUILD}",
            toolchain,
            stale=True,
        )
    return CoreBuild("compiled", "", toolchain)


class PureCoreFinder(MetaPathFinder):
    """Finds `audiences.core` and its modules, and the compiled adapters, as `.py` sources,
    never as extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if (
            fullname != PACKAGE
            and not fullname.startswith(PACKAGE + ".")
            and fullname not in _ADAPTER_MODULES
        ):
            return None
        name = fullname.rpartition(".")[2]
        for entry in path or ():
            base = os.path.join(entry, name)
            init = os.path.join(base, "__init__.py")
            if os.path.isfile(init):
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[base]
                )
            if os.path.isfile(base + ".py"):
                return importlib.util.spec_from_file_location(fullname, base + ".py")
        return None


def select_core(
    core_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> CoreBuild:
    """Decide once per process; when pure, put `PureCoreFinder` first on `sys.meta_path`."""
    core_dir = core_dir or Path(__file__).resolve().parent / "core"
    build = decide(core_dir, os.environ if environ is None else environ)
    if not build.compiled:
        if not any(isinstance(finder, PureCoreFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, PureCoreFinder())
        if build.stale:
            log.warning("audiences: running the pure Python core: %s", build.reason)
    return build
