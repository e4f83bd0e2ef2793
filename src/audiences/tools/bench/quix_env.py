"""The interpreter that runs the Quix Streams contender: a virtual environment of its own.

quixstreams 3.x pins `confluent-kafka<2.13`; this project needs `>=2.16`, so
the two cannot share an environment (and quixstreams is no extra of this
package). The bench runs `quix_app.py` with the interpreter named by
`AUDIENCES_BENCH_QUIX_PYTHON` if set, else with the one of a virtual
environment it creates on first use in `$XDG_CACHE_HOME/audiences/bench-quix`
(default `~/.cache/...`) with `python -m venv` and `pip install` of
QUIX_REQUIREMENT from the package index pip is configured with. When that
fails (no network, no index), the contender is reported unavailable with the
reason; the rest of the bench runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUIX_REQUIREMENT = "quixstreams>=3.28,<4"
PYTHON_ENV = "AUDIENCES_BENCH_QUIX_PYTHON"
INSTALL_TIMEOUT_S = 900


def venv_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "audiences" / "bench-quix"


def _version(python: str) -> str | None:
    """quixstreams' version under `python`, None when it does not import."""
    try:
        done = subprocess.run(
            [python, "-c", "import orjson, quixstreams; print(quixstreams.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def quix_python() -> tuple[str, str] | str:
    """(interpreter, quixstreams version), or why there is none."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        version = _version(configured)
        return (configured, version) if version else f"{PYTHON_ENV}={configured}: no quixstreams"
    home = venv_dir()
    python = str(home / "bin" / "python")
    if Path(python).exists() and (version := _version(python)):
        return python, version
    print(
        f"installing {QUIX_REQUIREMENT} into {home} (once: quixstreams pins "
        "confluent-kafka<2.13, this project needs >=2.16, so the Quix contender runs in an "
        "environment of its own) ...",
        file=sys.stderr,
    )
    try:
        for command in (
            [sys.executable, "-m", "venv", "--clear", str(home)],
            [python, "-m", "pip", "install", "--quiet", QUIX_REQUIREMENT, "orjson"],
        ):
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return f"cannot install {QUIX_REQUIREMENT}: {' / '.join(tail)}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot install {QUIX_REQUIREMENT}: {exc}"
    version = _version(python)
    return (python, version) if version else f"{QUIX_REQUIREMENT} installed but does not import"
