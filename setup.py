"""Build: compile `audiences.core` with mypyc (opt level 3) when it can, else stay pure Python.

With the core, the runtime's per-event path is compiled too (`_core_build.COMPILED_ADAPTERS`),
in the same mypyc group: the adapters call the core and read its objects natively (tests
patch the seams they keep for it, such as `partition.step_override`).

Metadata lives in pyproject.toml; this file only adds the compiled core. The modules are
compiled when a build runs `build_ext` (wheels, editable installs, `make core` =
`python setup.py build_ext --inplace`), not when pip only asks for metadata. Without a C
compiler, Python headers or mypyc, or when compilation fails, the build says so on one
line and the package stays pure Python. Either way it writes a build record
(`audiences/core/_build.json`: kind, reason, digest of the sources compiled) that
`audiences/_core_build.py` checks at import: edited sources never run compiled code.
``AUDIENCES_PURE_BUILD=1`` skips this step altogether (the Makefile's editable install
does, then builds the core in place with `make core`, once and visibly).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CORE = HERE / "src" / "audiences" / "core"
GROUP = "audiences.core.compiled"  # mypyc's shared library: audiences/core/compiled__mypyc.*.so


def _core_build_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_audiences_core_build", HERE / "src" / "audiences" / "_core_build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def toolchain_problem() -> str | None:
    """Why the core cannot be compiled here, or None."""
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, not {sys.implementation.name}"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc (package mypy) is not installed"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; install python3-dev)"
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not compiler or shutil.which(compiler[0]) is None:
        return f"no C compiler ({' '.join(compiler) or 'CC'} not found)"
    return None


def say(message: str) -> None:
    print(f"audiences: {message}", file=sys.stderr, flush=True)


class BuildCore(build_ext):
    """build_ext that generates the mypyc extensions when it runs, and falls back to pure."""

    problem: str | None = None
    toolchain = False

    def run(self) -> None:
        # Here, not in finalize_options: pip's metadata steps finalize build_ext too.
        if os.environ.get("AUDIENCES_PURE_BUILD", "") not in ("", "0"):
            say("AUDIENCES_PURE_BUILD is set: audiences.core not compiled (`make core` does it)")
            self._use([])
            return  # a compiled core already there, and its record, stay as they are
        self.problem = toolchain_problem()
        self.toolchain = self.problem is None
        modules: list[Extension] = []
        if self.problem is None:
            from mypyc.build import mypycify

            sources = [  # the packages' __init__ stay pure (see _core_build.module_names)
                str(p.relative_to(HERE))
                for p in sorted(CORE.rglob("*.py"))
                if p.name != "__init__.py"
            ]
            adapters = [
                str(p.relative_to(HERE)) for p in _core_build_module().adapter_sources(CORE)
            ]
            say(
                f"compiling audiences.core with mypyc (opt level 3, {len(sources)} modules, "
                f"and {len(adapters)} of the runtime's)"
            )
            try:
                modules = mypycify(sources + adapters, opt_level="3", group_name=GROUP)
            except (Exception, SystemExit) as exc:
                self.problem = f"mypyc failed: {exc!r}"
        self._use(modules)
        if self.problem is None:
            try:
                super().run()
            except Exception as exc:  # CompileError, LinkError, ...: stay pure
                self.problem = f"C compilation failed: {exc}"
        self._write_record()
        if self.problem is None:
            say("compiled core built: audiences.core runs compiled with mypyc")
        else:
            say(f"compiled core NOT built ({self.problem}): audiences.core stays pure Python")

    def _use(self, modules: list[Extension]) -> None:
        """The generated extensions (or none) replace the placeholder, finalized as
        setuptools' build_ext.finalize_options does (which cannot run twice)."""
        self.distribution.ext_modules = self.extensions = modules
        self.check_extensions_list(modules)
        self.ext_map = {}
        for ext in modules:
            full_name = ext._full_name = self.get_ext_fullname(ext.name)
            self.ext_map[full_name] = self.ext_map[full_name.split(".")[-1]] = ext
            ext._links_to_dynamic = ext._needs_stub = False  # no setuptools Library here
            ext._file_name = self.get_ext_filename(full_name)

    def _write_record(self) -> None:
        core_build = _core_build_module()
        record: dict[str, Any] = {
            "kind": "compiled" if self.problem is None else "pure",
            "reason": self.problem or "",
            "toolchain": self.toolchain,
            "compiler": "mypyc",
            "opt_level": "3",
            "ext_suffix": importlib.machinery.EXTENSION_SUFFIXES[0],
            "modules": core_build.module_names(CORE),
            "sources_sha256": core_build.source_digest(CORE),
        }
        if self.toolchain:
            from mypy.version import __version__ as mypy_version

            record["mypy"] = mypy_version
        # next to the compiled modules: the source tree when in place, else build_lib
        target = Path(self.get_ext_fullpath("audiences.core.evaluator")).parent
        target.mkdir(parents=True, exist_ok=True)
        (target / core_build.RECORD).write_text(json.dumps(record, indent=1) + "\n")


setup(
    # a placeholder: `BuildCore` replaces it with mypyc's extensions (or none) when it runs;
    # it also marks the wheel as platform-specific.
    ext_modules=[Extension("audiences.core.evaluator", sources=[])],
    cmdclass={"build_ext": BuildCore},
)
