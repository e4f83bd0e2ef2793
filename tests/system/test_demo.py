"""`audiences demo` (what `make demo` runs): broker, worker, shop, live transitions."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system


def test_demo_shows_abandoners_entering_after_the_window_and_exiting_on_late_orders() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiences",
            "demo",
            "--users",
            "40",
            "--hour-ms",
            "1000",
            "--duration",
            "40",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    entered = re.findall(r"Audience Entered\s+cart_abandoners\s+(\S+)", out)
    exited = re.findall(r"Audience Exited\s+cart_abandoners\s+(\S+)", out)
    assert entered, out[-3000:]
    assert exited and set(exited) <= set(entered), out[-3000:]  # late orders exit members
    assert "-- audience sizes: cart_abandoners=" in out
