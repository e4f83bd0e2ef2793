"""Micro-benchmark of the pure core: `parse_event`, `step` and the state codec, no I/O.

    python -m audiences.tools.bench.core [--events N] [--users N] [--repeat R]
        [--workload mixed|shop] [--profile] [--json]

Workload (deterministic, fixed seed): 20 audiences mixing every condition type of the
language (performed count / times-within / where / between, page_viewed, screen_viewed,
sequences with `then_not` and `then` on `match_on`, traits incl. a relative-time one,
in_audience, not/all/any, device with push, computed traits) plus 4 computed traits, and
Segment events of `users` users (identify, five shop events, page and screen views,
mobile and web contexts, push opt-outs) in time order over a week.

Phases, each timed in CPU time of the process (the machine may be shared) over every
event (best of `--repeat` runs; `step` from empty
profiles each run, so deadlines fire as they would live):
- parse: `parse_event(bytes)` per event;
- step: `step(state, event, catalog, key)` per event (including the deadlines due
  before it);
- encode / decode: `UserState.encode()` / `UserState.decode()` per profile at the end.

Prints µs per event (parse, step, total) and µs per profile (encode, decode), the mean
encoded size, the transitions per event and whether the core runs compiled (mypyc).
With `--profile`, prints cProfile's top entries of the step phase instead.
Nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from typing import Any

import orjson

from audiences.core import evaluator
from audiences.core.definitions import Catalog, build_catalog, validate_definition
from audiences.core.evaluator import step
from audiences.core.events import Event, format_iso, parse_event
from audiences.core.state import UserState

SEED = 20_260_101
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SECOND, MINUTE, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
SPAN_MS = 7 * DAY

PRODUCTS = [f"sku-{n:04d}" for n in range(500)]
CATEGORIES = ["shoes", "outerwear", "bags", "watches", "audio", "home", "kitchen", "outdoor"]
PRICES = [9, 19, 29, 49, 79, 99, 149, 199, 299, 499]
SCREENS = ["Home", "Home", "Search", "Product", "Cart"]
PAGES = ["/", "/products/{}", "/products/{}", "/pricing", "/blog/spring-sale", "/cart"]
DOMAINS = ["gmail.com", "hotmail.com", "example.com", "corp.example.org"]
LIBRARY = {"name": "analytics.js", "version": "5.2.0"}
USER_AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Safari/605.1.15"


def _performed(event: str, **body: Any) -> dict[str, Any]:
    return {"performed": {"event": event, **body}}


AUDIENCES: list[tuple[str, dict[str, Any]]] = [
    # performed ... times ... within, with a `where`
    (
        "window_shoppers",
        _performed(
            "Product Viewed",
            where=[{"property": "category", "op": "in", "value": ["shoes", "bags", "watches"]}],
            times={"gte": 3},
            within="1d",
        ),
    ),
    # started checkout but no order within 2 hours
    (
        "cart_abandoners",
        {
            "sequence": {
                "steps": [{"event": "Checkout Started"}],
                "then_not": {"event": "Order Completed", "within": "2h"},
                "match_on": "properties.cart_id",
                "active_for": "7d",
            }
        },
    ),
    (
        "big_spenders",
        _performed(
            "Order Completed",
            where=[{"property": "revenue", "op": "gte", "value": 100}],
            within="30d",
        ),
    ),
    ("pro_plan", {"trait": {"name": "plan", "op": "in", "value": ["pro", "team"]}}),
    ("loyal_pros", {"all": [{"in_audience": "big_spenders"}, {"in_audience": "pro_plan"}]}),
    (
        "browsing_not_buying",
        {
            "all": [
                _performed("Product Viewed", times={"gte": 4}, within="3d"),
                {"not": _performed("Order Completed", within="14d")},
            ]
        },
    ),
    # a funnel with a positive follow-up
    (
        "checkout_funnel",
        {
            "sequence": {
                "steps": [
                    {"event": "Product Added"},
                    {"event": "Checkout Started", "within": "1h"},
                ],
                "then": {"event": "Order Completed", "within": "3h"},
                "match_on": "properties.cart_id",
                "active_for": "3d",
            }
        },
    ),
    (
        "engaged",
        {
            "any": [
                _performed("Product Added", times={"gte": 2}, within="7d"),
                {"in_audience": "big_spenders"},
                {
                    "all": [
                        {"trait": {"name": "plan", "op": "eq", "value": "free"}},
                        _performed("Checkout Started", within="1d"),
                    ]
                },
            ]
        },
    ),
    # a lifetime count
    ("repeat_buyers", _performed("Order Completed", times={"gte": 3})),
    # between
    (
        "lapsed_browsers",
        _performed("Product Viewed", times={"gte": 2}, between=["1d", "3d"]),
    ),
    ("pricing_visitors", {"page_viewed": {"url": "*/pricing*", "within": "7d"}}),
    ("app_regulars", {"screen_viewed": {"name": "Home", "times": {"gte": 3}, "within": "7d"}}),
    ("ios_push", {"device": {"type": "ios", "push_enabled": True}}),
    ("web_users", {"device": {"type": "web"}}),
    ("high_ltv", {"computed": {"name": "lifetime_value", "op": "gte", "value": 300}}),
    ("frequent_buyers", {"computed": {"name": "orders_30d", "op": "gte", "value": 2}}),
    # relative time: true for 14 days after the trait's time
    ("recent_signups", {"trait": {"name": "signed_up_at", "op": "within_last", "value": "14d"}}),
    ("shoe_fans", {"computed": {"name": "favourite_category", "op": "eq", "value": "shoes"}}),
    (
        "free_webmail",
        {
            "all": [
                {"trait": {"name": "email", "op": "contains", "value": "gmail|hotmail"}},
                {"trait": {"name": "plan", "op": "eq", "value": "free"}},
            ]
        },
    ),
    # did not perform
    ("never_ordered", _performed("Order Completed", times={"eq": 0})),
]

TRAITS: list[dict[str, Any]] = [
    {
        "key": "lifetime_value",
        "kind": "sum",
        "event": "Order Completed",
        "property": "properties.revenue",
    },
    {"key": "orders_30d", "kind": "count", "event": "Order Completed", "within": "30d"},
    {
        "key": "favourite_category",
        "kind": "most_frequent",
        "event": "Product Viewed",
        "property": "properties.category",
        "within": "30d",
    },
    {
        "key": "avg_order",
        "kind": "avg",
        "event": "Order Completed",
        "property": "properties.revenue",
    },
]


def make_definitions() -> list[dict[str, Any]]:
    """The 20 audiences and 4 computed traits, validated."""
    docs = [
        validate_definition({"key": key, "name": key.replace("_", " "), "condition": condition})
        for key, condition in AUDIENCES
    ]
    return docs + [validate_definition(dict(doc)) for doc in TRAITS]


def make_catalog() -> Catalog:
    catalog = build_catalog({doc["key"]: (doc, 1) for doc in make_definitions()})
    if catalog.skipped:
        raise ValueError(f"definitions not evaluable: {catalog.skipped}")
    return catalog


def make_events(count: int, users: int, seed: int = SEED) -> list[bytes]:
    """`count` Segment events (JSON) of `users` users in time order, from `seed`."""
    rng = random.Random(seed)
    carts: dict[int, str] = {}
    rows: list[tuple[int, int, dict[str, Any]]] = []
    while len(rows) < count:
        user = rng.randrange(users)
        t = BASE_MS + rng.randrange(SPAN_MS)
        mobile = user % 3 == 0
        if mobile:
            device: dict[str, Any] = {"id": f"dev-{user:07d}", "type": "ios"}
            if user % 2:
                device["token"] = f"tok-{user:07d}"
            os_name = "iOS" if user % 4 else "Android"
            context: dict[str, Any] = {
                "device": device,
                "os": {"name": os_name, "version": "17.4"},
                "library": {"name": "analytics-ios", "version": "4.1.0"},
            }
        else:
            context = {"library": LIBRARY, "userAgent": USER_AGENT}
        if rng.random() < 0.2:
            traits = {
                "plan": rng.choice(("free", "free", "free", "pro", "team")),
                "email": f"user{user}@{DOMAINS[user % len(DOMAINS)]}",
                "signed_up_at": format_iso(BASE_MS - rng.randrange(30) * DAY),
            }
            rows.append((t, user, {"type": "identify", "traits": traits, "context": context}))
        for _ in range(rng.randint(1, 4)):
            t += rng.randint(10, 300) * SECOND
            body: dict[str, Any]
            if mobile:
                body = {"type": "screen", "name": rng.choice(SCREENS)}
            else:
                url = "https://shop.example.com" + rng.choice(PAGES).format(rng.choice(PRODUCTS))
                body = {"type": "page", "name": "Shop", "properties": {"url": url}}
            rows.append((t, user, {**body, "context": context}))
            t += rng.randint(5, 60) * SECOND
            favourite = rng.random() < 0.7  # each user has a favourite category
            properties = {
                "product_id": rng.choice(PRODUCTS),
                "category": CATEGORIES[user % 8] if favourite else rng.choice(CATEGORIES),
                "price": rng.choice(PRICES),
            }
            rows.append((t, user, _track("Product Viewed", properties, context)))
        if rng.random() < 0.5:
            cart = carts.get(user)
            if cart is None:
                cart = carts[user] = f"cart-{user}-{rng.randrange(1_000_000)}"
            price = rng.choice(PRICES)
            t += rng.randint(10, 600) * SECOND
            added = {"cart_id": cart, "product_id": rng.choice(PRODUCTS), "price": price}
            rows.append((t, user, _track("Product Added", added, context)))
            if rng.random() < 0.6:
                t += rng.randint(1, 30) * MINUTE
                checkout = {"cart_id": cart, "revenue": price}
                rows.append((t, user, _track("Checkout Started", checkout, context)))
                if rng.random() < 0.55:
                    t += rng.randint(2, 240) * MINUTE  # some orders come after the window
                    rows.append((t, user, _track("Order Completed", checkout, context)))
                    del carts[user]
        if mobile and rng.random() < 0.03:
            t += rng.randint(1, 60) * MINUTE
            rows.append((t, user, _track("Push Notifications Disabled", {}, context)))
    del rows[count:]
    rows.sort(key=lambda row: row[0])
    out: list[bytes] = []
    for seq, (at, user, body) in enumerate(rows):
        body["userId"] = f"user-{user:07d}"
        body["messageId"] = f"bench-{seq:09d}"
        body["timestamp"] = format_iso(at)
        out.append(orjson.dumps(body))
    return out


def _track(name: str, properties: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return {"type": "track", "event": name, "properties": properties, "context": context}


def is_compiled() -> bool:
    """Whether the core runs as mypyc-compiled extension modules."""
    return not evaluator.__file__.endswith(".py")


class Run:
    """One pass of the workload: every phase timed, results kept for checking."""

    def __init__(self, data: list[bytes], catalog: Catalog) -> None:
        self.data = data
        self.catalog = catalog
        self.events: list[Event] = []
        self.states: dict[str, UserState] = {}
        self.transitions = 0
        self.encoded: list[bytes] = []

    def parse(self) -> float:
        """Timed as the engine parses: each event dropped after use. The events `step`
        reads are parsed again, untimed, and frozen out of the garbage collector's
        scans (200k live events would double the parse time with collections)."""
        data = self.data
        started = time.process_time()
        for item in data:
            parse_event(item, 0)
        elapsed = time.process_time() - started
        self.events = [parse_event(item, 0) for item in data]
        gc.freeze()
        return elapsed

    def step(self) -> float:
        catalog = self.catalog
        states: dict[str, UserState] = {}
        transitions = 0
        started = time.process_time()
        for event in self.events:
            key = event.key
            result = step(states.get(key), event, catalog, key)
            states[key] = result.state
            transitions += len(result.transitions)
        elapsed = time.process_time() - started
        self.states, self.transitions = states, transitions
        return elapsed

    def encode(self) -> float:
        started = time.process_time()
        self.encoded = [state.encode() for state in self.states.values()]
        return time.process_time() - started

    def decode(self) -> float:
        started = time.process_time()
        for data in self.encoded:
            UserState.decode(data)
        return time.process_time() - started


def workload(name: str, events: int, users: int, seed: int) -> tuple[Catalog, list[bytes]]:
    """`mixed`: this module's 20 audiences of every condition type and 4 computed traits;
    `shop`: the 20 audiences and events of `audiences bench` (tools/bench/runner.py)."""
    if name == "mixed":
        return make_catalog(), make_events(events, users, seed)
    from audiences.tools.bench import runner  # (imports the Kafka adapters)

    docs = runner.make_definitions(20)
    catalog = build_catalog({doc["key"]: (doc, 1) for doc in docs})
    return catalog, [value for _key, value in runner.make_events(events, users, seed)]


def measure(
    events: int, users: int, repeat: int, seed: int = SEED, name: str = "mixed"
) -> dict[str, Any]:
    """Best-of-`repeat` seconds of each phase, as µs per event or per profile."""
    catalog, data = workload(name, events, users, seed)
    best: dict[str, float] = {}
    run = Run(data, catalog)
    for _ in range(repeat):
        run = Run(data, catalog)
        gc.unfreeze()
        gc.collect()
        gc.freeze()  # the workload's data: not scanned by collections
        for phase in ("parse", "step", "encode", "decode"):
            seconds = getattr(run, phase)()
            best[phase] = min(best.get(phase, seconds), seconds)
    profiles = len(run.states)
    parse_us = best["parse"] * 1e6 / events
    step_us = best["step"] * 1e6 / events
    return {
        "workload": name,
        "compiled": is_compiled(),
        "python": sys.version.split()[0],
        "events": events,
        "users": users,
        "profiles": profiles,
        "audiences": len(catalog.audiences),
        "computed_traits": len(catalog.traits),
        "transitions_per_event": round(run.transitions / events, 4),
        "parse_us": round(parse_us, 3),
        "step_us": round(step_us, 3),
        "total_us": round(parse_us + step_us, 3),
        "encode_us_per_profile": round(best["encode"] * 1e6 / profiles, 3),
        "decode_us_per_profile": round(best["decode"] * 1e6 / profiles, 3),
        "mean_state_bytes": round(sum(map(len, run.encoded)) / profiles, 1),
    }


def profile_step(events: int, users: int, top: int, seed: int = SEED, name: str = "mixed") -> None:
    """cProfile's top entries (by own time) of one step phase."""
    import cProfile
    import pstats

    catalog, data = workload(name, events, users, seed)
    run = Run(data, catalog)
    gc.freeze()
    run.parse()
    profiler = cProfile.Profile()
    profiler.enable()
    run.step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m audiences.tools.bench.core")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--workload", choices=("mixed", "shop"), default="mixed")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--profile", action="store_true", help="cProfile the step phase")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.profile:
        profile_step(args.events, args.users, args.top, args.seed, args.workload)
        return
    figures = measure(args.events, args.users, args.repeat, args.seed, args.workload)
    if args.json:
        print(orjson.dumps(figures).decode())
        return
    print(
        f"core, {figures['workload']} workload "
        f"({'mypyc-compiled' if figures['compiled'] else 'pure Python'}, "
        f"Python {figures['python']}): {figures['audiences']} audiences, "
        f"{figures['computed_traits']} computed traits, {figures['events']} events, "
        f"{figures['profiles']} profiles, {figures['transitions_per_event']} transitions/event"
    )
    print(f"  parse   {figures['parse_us']:8.2f} µs/event")
    print(f"  step    {figures['step_us']:8.2f} µs/event")
    print(f"  total   {figures['total_us']:8.2f} µs/event")
    print(
        f"  encode  {figures['encode_us_per_profile']:8.2f} µs/profile "
        f"(mean {figures['mean_state_bytes']:.0f} bytes)"
    )
    print(f"  decode  {figures['decode_us_per_profile']:8.2f} µs/profile")


if __name__ == "__main__":
    main()
