"""A generated shop: deterministic Segment traffic for the demo and the benchmark.

Shoppers browse, add to cart, start checkouts and (often, not always) order;
the messaging tools report push and email engagement as in the seeds'
re-engagement flow (push -> email -> ads). `hour_ms` scales time: with
`hour_ms=3_600_000` it is real time, with `hour_ms=5_000` two hours pass in
ten seconds and the demo's definitions use windows of that scale.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from audiences.core.events import format_iso

PRODUCTS = ["sneakers", "jacket", "backpack", "watch", "headphones", "lamp", "mug", "tent"]
CAMPAIGNS = ["cart_push_10", "cart_email_10", "winback"]


@dataclass(frozen=True)
class ShopConfig:
    users: int = 50
    hour_ms: int = 3_600_000
    seed: int = 7
    order_rate: float = 0.55  # share of checkouts that end in an order
    late_order_rate: float = 0.2  # of those, share ordered after the 2h window


SHOPS = 8  # accounts the demo's shoppers belong to


def _event(kind: str, user: str, at_ms: int, seq: int, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": kind,
        "userId": user,
        "timestamp": format_iso(at_ms),
        "messageId": f"shop-{user}-{seq}",
        "context": {"library": {"name": "audiences-shop"}},
    }
    body.update(fields)
    return body


def shopper_journey(
    user: str, start_ms: int, rng: random.Random, config: ShopConfig
) -> list[tuple[int, dict[str, Any]]]:
    """One shopper's visit: (time, event) pairs, in time order."""
    hour = config.hour_ms
    out: list[tuple[int, dict[str, Any]]] = []
    seq = 0

    def add(at: int, kind: str, **fields: Any) -> None:
        nonlocal seq
        seq += 1
        out.append((at, _event(kind, user, at, seq, **fields)))

    t = start_ms
    add(
        t,
        "identify",
        traits={"email": f"{user}@example.com", "plan": rng.choice(["free", "free", "pro"])},
        context={"device": {"type": rng.choice(["ios", "android"]), "token": f"tok-{user}"}},
    )
    # The shop the shopper belongs to (an account: the demo's account audience), chosen
    # from the id so that the random journey is the same as without it.
    shop = sum(user.encode()) % SHOPS
    add(t, "group", groupId=f"shop-{shop}", traits={"name": f"Shop {shop}"})
    for _ in range(rng.randint(1, 5)):
        t += rng.randint(1, 6) * hour // 60
        add(
            t,
            "page",
            name="Product",
            properties={"url": f"https://shop.example/p/{rng.choice(PRODUCTS)}"},
        )
        add(t, "track", event="Product Viewed", properties={"product_id": rng.choice(PRODUCTS)})
    if rng.random() < 0.7:
        cart = f"cart-{user}-{rng.randint(1000, 9999)}"
        price = rng.choice([19, 49, 99, 149, 299])
        t += rng.randint(1, 10) * hour // 60
        add(t, "track", event="Product Added", properties={"cart_id": cart, "price": price})
        t += rng.randint(1, 10) * hour // 60
        add(t, "track", event="Checkout Started", properties={"cart_id": cart, "revenue": price})
        if rng.random() < config.order_rate:
            late = rng.random() < config.late_order_rate
            t += (
                (2 * hour + rng.randint(10, 60) * hour // 60)
                if late
                else rng.randint(5, 90) * hour // 60
            )
            add(t, "track", event="Order Completed", properties={"cart_id": cart, "revenue": price})
        else:
            # re-engagement: push after the window, maybe opened; email later, maybe opened
            t += 2 * hour + hour // 6
            add(
                t,
                "track",
                event="Push Notification Received",
                properties={"campaign_name": CAMPAIGNS[0]},
            )
            if rng.random() < 0.3:
                t += rng.randint(1, 20) * hour // 60
                add(
                    t,
                    "track",
                    event="Push Notification Opened",
                    properties={"campaign_name": CAMPAIGNS[0]},
                )
            t += hour
            add(t, "track", event="Email Delivered", properties={"campaign_name": CAMPAIGNS[1]})
            if rng.random() < 0.4:
                t += rng.randint(5, 50) * hour // 60
                add(t, "track", event="Email Opened", properties={"campaign_name": CAMPAIGNS[1]})
    return out


def shop_traffic(
    config: ShopConfig, start_ms: int, spread_ms: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every shopper's journey, starting within `spread_ms` of `start_ms`, merged in time order."""
    rng = random.Random(config.seed)
    events: list[tuple[int, dict[str, Any]]] = []
    for index in range(config.users):
        begin = start_ms + rng.randint(0, max(0, spread_ms))
        events.extend(shopper_journey(f"shopper-{index:04d}", begin, rng, config))
    events.sort(key=lambda pair: pair[0])
    yield from events
