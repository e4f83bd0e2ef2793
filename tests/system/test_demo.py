"""`audiences demo` (what `make demo` runs): broker, worker, shop, live transitions."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from audiences.tools.simulation import ShopConfig, shop_traffic

pytestmark = pytest.mark.system

SEED = 3  # a shop whose 40 users include late orders (checked below, not assumed)


def late_orderers(users: int, hour_ms: int, seed: int) -> set[str]:
    """Users whose order came more than the 2-hour window after their checkout."""
    checkouts: dict[str, int] = {}
    late: set[str] = set()
    config = ShopConfig(users=users, hour_ms=hour_ms, seed=seed)
    for at_ms, event in shop_traffic(config, 0, users * hour_ms // 6):
        cart = (event.get("properties") or {}).get("cart_id")
        if event.get("event") == "Checkout Started":
            checkouts[cart] = at_ms
        elif event.get("event") == "Order Completed" and at_ms - checkouts[cart] > 2 * hour_ms:
            late.add(event["userId"])
    return late


def test_demo_shows_abandoners_entering_after_the_window_and_exiting_on_late_orders() -> None:
    late = late_orderers(40, 1000, SEED)
    assert late, "the seed must produce late orders for this test to mean anything"
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
            "--seed",
            str(SEED),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"console: http://127\.0\.0\.1:\d+/ui", out), out[:2000]
    entered = re.findall(r"Audience Entered\s+cart_abandoners\s+(\S+)", out)
    exited = re.findall(r"Audience Exited\s+cart_abandoners\s+(\S+)", out)
    assert entered, out[-3000:]
    # every late order makes an abandoner exit, and nobody else exits
    assert set(exited) == late and late <= set(entered), out[-3000:]
    assert "-- audience sizes: cart_abandoners=" in out
