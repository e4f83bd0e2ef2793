"""The compiled core's guard (`audiences/_core_build.py`): edited sources never run stale
compiled modules, `AUDIENCES_PURE_CORE=1` really loads the `.py` sources, and a built core
really runs compiled. Never edits the real sources: a temporary copy or a patched digest."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import audiences
from audiences import _core_build
from audiences._core_build import (
    COMPILED_ADAPTERS,
    PURE_ENV,
    RECORD,
    decide,
    module_names,
    source_digest,
)

PACKAGE_DIR = Path(audiences.__file__).resolve().parent
CORE_DIR = PACKAGE_DIR / "core"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
PROBE = (
    "import audiences, audiences.core.evaluator as e, audiences.core.definitions.conditions as c;"
    "import audiences.adapters.stream.evaluation as v;"
    "print(audiences.core_build().kind, e.__file__, c.__file__, v.__file__)"
)


def fake_build(core: Path) -> None:
    """A small core with a build record and (empty) extension files, as setup.py leaves it."""
    (core / "definitions").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "evaluator.py").write_text("X = 1\n")
    (core / "definitions" / "__init__.py").write_text("")
    (core / "definitions" / "catalog.py").write_text("Y = 2\n")
    modules = module_names(core)
    assert modules == ["audiences.core.definitions.catalog", "audiences.core.evaluator"]
    for path in (core / "evaluator.py", core / "definitions" / "catalog.py"):
        path.with_suffix(SUFFIX).write_bytes(b"")
    record = {
        "kind": "compiled",
        "reason": "",
        "toolchain": True,
        "ext_suffix": SUFFIX,
        "modules": modules,
        "sources_sha256": source_digest(core),
    }
    (core / RECORD).write_text(json.dumps(record))


def test_a_fresh_build_runs_compiled_and_an_edited_source_makes_it_stale(tmp_path: Path) -> None:
    core = tmp_path / "core"
    fake_build(core)
    assert decide(core, {}).kind == "compiled"
    (core / "definitions" / "catalog.py").write_text("Y = 3\n")
    build = decide(core, {})
    assert (build.kind, build.stale, build.toolchain) == ("pure", True, True)
    assert "stale" in build.reason and "make core" in build.reason


def test_a_new_source_file_makes_it_stale_too(tmp_path: Path) -> None:
    core = tmp_path / "core"
    fake_build(core)
    (core / "definitions" / "extra.py").write_text("")
    assert decide(core, {}).stale


def test_the_runtimes_per_event_path_is_compiled_and_checked_with_the_core(
    tmp_path: Path,
) -> None:
    core = tmp_path / "core"
    fake_build(core)
    adapter = tmp_path / "adapters" / "stream" / "evaluation.py"
    adapter.parent.mkdir(parents=True)
    adapter.write_text("Z = 1\n")
    assert "adapters/stream/evaluation.py" in COMPILED_ADAPTERS
    assert module_names(core)[-1] == "audiences.adapters.stream.evaluation"
    assert decide(core, {}).stale  # compiled without it: its digest differs
    record = json.loads((core / RECORD).read_text())
    record["modules"], record["sources_sha256"] = module_names(core), source_digest(core)
    (core / RECORD).write_text(json.dumps(record))
    assert "another Python" in decide(core, {}).reason  # its extension is missing
    adapter.with_suffix(SUFFIX).write_bytes(b"")
    assert decide(core, {}).kind == "compiled"
    adapter.write_text("Z = 2\n")  # an edited adapter: the whole build is stale
    assert decide(core, {}).stale


def test_pure_when_forced_unbuilt_or_built_for_another_python(tmp_path: Path) -> None:
    core = tmp_path / "core"
    fake_build(core)
    assert decide(core, {PURE_ENV: "1"}).reason == f"{PURE_ENV}=1"
    assert decide(core, {PURE_ENV: "0"}).kind == "compiled"
    (core / "evaluator.py").with_suffix(SUFFIX).unlink()
    assert "another Python" in decide(core, {}).reason
    (core / RECORD).unlink()
    assert decide(core, {}).kind == "pure"
    (core / RECORD).write_text(json.dumps({"kind": "pure", "reason": "no C compiler"}))
    assert decide(core, {}).reason == "no C compiler"


def test_the_real_record_is_checked_against_the_real_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not (CORE_DIR / RECORD).exists():
        pytest.skip("the core has no build record here (never built)")
    record = json.loads((CORE_DIR / RECORD).read_text())
    monkeypatch.setattr(_core_build, "source_digest", lambda core: "0" * 64)
    build = decide(CORE_DIR, {})
    assert build.kind == "pure"
    assert build.stale == (record["kind"] == "compiled" and record["ext_suffix"] == SUFFIX)


def run_probe(env: dict[str, str], path: Path | None = None) -> subprocess.CompletedProcess[str]:
    if path is not None:
        env = {**env, "PYTHONPATH": str(path)}  # ahead of the installed package
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def test_pure_core_env_loads_the_python_sources() -> None:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    kind, evaluator, conditions, evaluation = run_probe({**env, PURE_ENV: "1"}).stdout.split()
    assert kind == "pure"
    assert evaluator.endswith("evaluator.py") and conditions.endswith("conditions.py")
    assert evaluation.endswith("evaluation.py")


def test_by_default_a_built_core_runs_compiled() -> None:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    expected = decide(CORE_DIR, env)
    kind, evaluator, conditions, evaluation = run_probe(env).stdout.split()
    assert kind == expected.kind
    suffix = SUFFIX if expected.compiled else ".py"
    assert evaluator.endswith(suffix) and conditions.endswith(suffix)
    assert evaluation.endswith(suffix)


def test_an_edited_copy_of_a_compiled_build_runs_pure_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if not decide(CORE_DIR, env).compiled:
        pytest.skip("the core is not compiled here")
    copy = tmp_path / "audiences"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert (copy / "core" / "evaluator.py").with_suffix(SUFFIX).is_file()
    conditions = copy / "core" / "definitions" / "conditions.py"
    conditions.write_text(conditions.read_text() + "\n# edited\n")
    done = run_probe(env, tmp_path)
    kind, evaluator, conditions_file, evaluation = done.stdout.split()
    assert kind == "pure"
    assert evaluator == str(copy / "core" / "evaluator.py")
    assert evaluation == str(copy / "adapters" / "stream" / "evaluation.py")
    assert conditions_file == str(conditions)
    assert "stale" in done.stderr and done.stderr.count("stale") == 1
