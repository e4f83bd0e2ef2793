"""The workload of `audiences bench`: audience definitions and Segment events, deterministic.

Definitions: `count` audiences from templates (performed with times/within and
where, sequence with then_not/then + match_on, trait, in_audience, not/all/any;
windows of hours and days), cycling through TEMPLATES with growing windows.

Events (~200 bytes of JSON: identify with plan/email, Product Viewed, Product
Added and Checkout Started with a cart_id, Order Completed with revenue) of a
population of `users` shoppers, in shopping sessions spread over a week from a
fixed base time, from a fixed seed. Who shops is Zipf-distributed (exponent
ZIPF_S: user of rank r is picked with weight 1/r^s), so a few users are very
active and most appear once or twice, as on a real site. Two session shapes:

- `realistic`: short browsing sessions, few identifies and carts, so that about
  one event in ten causes a transition (the bench reports the measured rate);
- `heavy`: the transition-heavy shape of earlier releases (an identify in a
  quarter of the sessions, a cart in half): about one transition per event.

`counting_rules` extracts the `performed … times … within` conditions of the
definitions, for the contenders that do per-user counting only (Quix Streams
and the plain loop, see `counting.py`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import orjson

from audiences.core.definitions import build_catalog, check_references, validate_definition
from audiences.core.durations import parse_duration_ms
from audiences.core.events import format_iso
from audiences.errors import AudiencesError

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: events start here
SEED = 20_260_101
SECOND, MINUTE, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
SPAN_MS = 7 * DAY  # sessions start within a week
ZIPF_S = 0.8

PRODUCTS = [f"sku-{n:04d}" for n in range(500)]
CATEGORIES = ["shoes", "outerwear", "bags", "watches", "audio", "home", "kitchen", "outdoor"]
PRICES = [9, 19, 29, 49, 79, 99, 149, 199, 299, 499]
PLANS = ("free", "free", "free", "pro", "team")
CONTEXT = {"library": {"name": "analytics.js", "version": "5.2.0"}}

# -- definitions --------------------------------------------------------------------------

TEMPLATES = (
    "window_shoppers",
    "cart_abandoners",
    "big_spenders",
    "pro_plan",
    "loyal_pros",
    "browsing_not_buying",
    "checkout_funnel",
    "engaged",
)


def _condition(kind: str, r: int) -> dict[str, Any]:
    """Condition of template `kind` in round `r` (rounds vary thresholds and windows).

    Templates that use `in_audience` refer to audiences of the same round that
    come earlier in TEMPLATES, so they always exist.
    """
    if kind == "window_shoppers":
        return {
            "performed": {
                "event": "Product Viewed",
                "times": {"gte": (3, 6, 10)[r % 3]},
                "within": ("1h", "1d", "7d")[r % 3],
            }
        }
    if kind == "cart_abandoners":
        return {
            "sequence": {
                "steps": [{"event": "Checkout Started"}],
                "then_not": {"event": "Order Completed", "within": f"{2 + r}h"},
                "match_on": "properties.cart_id",
                "active_for": "7d",
            }
        }
    if kind == "big_spenders":
        return {
            "performed": {
                "event": "Order Completed",
                "where": [{"property": "revenue", "op": "gte", "value": 50 * (1 + r)}],
                "within": f"{7 * (1 + r)}d",
            }
        }
    if kind == "pro_plan":
        if r == 0:
            return {"trait": {"name": "plan", "op": "eq", "value": "pro"}}
        return {
            "all": [
                {"trait": {"name": "plan", "op": "in", "value": ["pro", "team"]}},
                {"trait": {"name": "email", "op": "exists"}},
            ]
        }
    if kind == "loyal_pros":
        return {"all": [{"in_audience": f"big_spenders_{r}"}, {"in_audience": f"pro_plan_{r}"}]}
    if kind == "browsing_not_buying":
        return {
            "all": [
                {
                    "performed": {
                        "event": "Product Viewed",
                        "times": {"gte": 4},
                        "within": f"{3 * (1 + r)}d",
                    }
                },
                {"not": {"performed": {"event": "Order Completed", "within": f"{14 * (1 + r)}d"}}},
            ]
        }
    if kind == "checkout_funnel":
        return {
            "sequence": {
                "steps": [
                    {"event": "Product Added"},
                    {"event": "Checkout Started", "within": "1h"},
                ],
                "then": {"event": "Order Completed", "within": f"{2 + r}h"},
                "match_on": "properties.cart_id",
                "active_for": "3d",
            }
        }
    if kind == "engaged":
        return {
            "any": [
                {
                    "performed": {
                        "event": "Product Added",
                        "times": {"gte": 2},
                        "within": f"{7 * (1 + r)}d",
                    }
                },
                {"in_audience": f"big_spenders_{r}"},
                {
                    "all": [
                        {"trait": {"name": "plan", "op": "eq", "value": "free"}},
                        {"performed": {"event": "Checkout Started", "within": f"{1 + r}d"}},
                    ]
                },
            ]
        }
    raise ValueError(kind)


def make_definitions(count: int) -> list[dict[str, Any]]:
    """`count` validated definitions, cycling through TEMPLATES with growing windows."""
    docs: list[dict[str, Any]] = []
    for index in range(count):
        kind = TEMPLATES[index % len(TEMPLATES)]
        r = index // len(TEMPLATES)
        key = f"{kind}_{r}"
        doc = validate_definition(
            {
                "key": key,
                "name": f"{kind.replace('_', ' ').capitalize()} #{r}",
                "condition": _condition(kind, r),
            }
        )
        check_references(doc, {d["key"]: d for d in docs})
        docs.append(doc)
    catalog = build_catalog({d["key"]: (d, 1) for d in docs})
    if catalog.skipped:
        raise AudiencesError(f"bench definitions not evaluable: {catalog.skipped}")
    return docs


# -- events -------------------------------------------------------------------------------

WORKLOADS = ("realistic", "heavy")
IDENTIFY, VIEWED, ADDED, CHECKOUT, ORDER, PAGE, SEARCHED = range(7)
KIND_NAMES = (
    "identify",
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Order Completed",
    "page",
    "Products Searched",
)
PAGES = ("Home", "Category", "Product", "Search", "Cart")
QUERIES = ("boots", "rain jacket", "backpack", "headphones", "espresso", "tent", "watch")


@dataclass(frozen=True)
class Shape:
    """One shopping session: an identify first (share of sessions), views, maybe a cart."""

    identify: float
    views: tuple[int, ...]  # the number of product views is drawn from these
    view_gap_s: tuple[int, int]
    cart: float
    checkout: float  # of carts
    order: float  # of checkouts
    pages: float = 0.0  # chance of a page view before each product view
    search: float = 0.0  # chance of a search in a session


SHAPES = {
    "realistic": Shape(
        identify=0.02,
        views=(1, 1, 1, 1, 2),
        view_gap_s=(60, 1800),
        cart=0.08,
        checkout=0.5,
        order=0.6,
        pages=0.8,
        search=0.3,
    ),
    "heavy": Shape(
        identify=0.25,
        views=(1, 2, 3, 4, 5),
        view_gap_s=(10, 300),
        cart=0.5,
        checkout=0.6,
        order=0.55,
    ),
}

Row = tuple[int, int, int, int, int]  # (ms, user, kind, a, b): compact until rendered


@dataclass
class Workload:
    """Rows in time order (rendered one by one when produced) and what they hold."""

    name: str
    users: int  # the population
    rows: list[Row]

    def __len__(self) -> int:
        return len(self.rows)

    def active_users(self) -> int:
        """Distinct users with at least one event: the profiles a contender ends up holding."""
        return len({row[1] for row in self.rows})

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        for seq, row in enumerate(self.rows):
            yield render(seq, row)


def one_per_user(profiles: int, workload: str = "realistic", seed: int = SEED) -> Workload:
    """`profiles` events of as many distinct users (the memory phase: every event makes a
    profile): the workload's events, in time order, each given to the next user."""
    rows = generate(profiles, profiles, workload, seed).rows
    return Workload(
        workload, profiles, [(ms, n, kind, a, b) for n, (ms, _user, kind, a, b) in enumerate(rows)]
    )


def zipf_picker(users: int, rng: random.Random, s: float = ZIPF_S) -> Iterator[int]:
    """User numbers drawn forever with weight 1/rank^s (rank = number + 1)."""
    cum = list(accumulate(rank**-s for rank in range(1, users + 1)))
    population = range(users)
    while True:
        yield from rng.choices(population, cum_weights=cum, k=4_096)


def generate(count: int, users: int, workload: str = "realistic", seed: int = SEED) -> Workload:
    """`count` events of `users` shoppers in sessions of the `workload` shape, time-ordered."""
    if workload not in SHAPES:
        raise AudiencesError(f"unknown workload {workload!r}: expected one of {WORKLOADS}")
    shape = SHAPES[workload]
    rng = random.Random(seed)
    picks = zipf_picker(users, rng)
    carts: dict[int, int] = {}
    rows: list[Row] = []
    add = rows.append
    while len(rows) < count:
        user = next(picks)
        t = BASE_MS + rng.randrange(SPAN_MS)
        if rng.random() < shape.identify:
            add((t, user, IDENTIFY, rng.randrange(len(PLANS)), 0))
        if shape.search and rng.random() < shape.search:
            t += rng.randint(5, 60) * SECOND
            add((t, user, SEARCHED, rng.randrange(len(QUERIES)), 0))
        for _ in range(rng.choice(shape.views)):
            t += rng.randint(*shape.view_gap_s) * SECOND
            product = rng.randrange(len(PRODUCTS))
            if shape.pages and rng.random() < shape.pages:
                add((t, user, PAGE, rng.randrange(len(PAGES)), product))
                t += rng.randint(1, 5) * SECOND
            add((t, user, VIEWED, product, rng.randrange(len(CATEGORIES))))
        if rng.random() < shape.cart:
            cart = carts.get(user)
            if cart is None:
                cart = carts[user] = rng.randrange(1_000_000)
            price = rng.choice(PRICES)
            t += rng.randint(10, 600) * SECOND
            add((t, user, ADDED, cart, rng.randrange(len(PRODUCTS))))
            if rng.random() < shape.checkout:
                t += rng.randint(1, 30) * MINUTE
                add((t, user, CHECKOUT, cart, price))
                if rng.random() < shape.order:
                    t += rng.randint(2, 240) * MINUTE  # some orders come after the window
                    add((t, user, ORDER, cart, price))
                    del carts[user]
    del rows[count:]
    rows.sort(key=lambda row: row[0])
    return Workload(workload, users, rows)


def render(seq: int, row: Row, at: int | None = None) -> tuple[bytes, bytes]:
    """(key, JSON value) of row number `seq`; `at` overrides its time (live traffic)."""
    ms, user, kind, a, b = row
    user_id = f"user-{user:07d}"
    body: dict[str, Any]
    if kind == IDENTIFY:
        plan = PLANS[a]
        body = {
            "type": "identify",
            "userId": user_id,
            "traits": {"plan": plan, "email": f"user{user}@example.com"},
        }
    elif kind == PAGE:
        name = PAGES[a]
        path = f"/{name.lower()}/{PRODUCTS[b]}"
        body = {
            "type": "page",
            "name": name,
            "userId": user_id,
            "properties": {"path": path, "url": f"https://shop.example.com{path}"},
        }
    else:
        if kind == VIEWED:
            fields: dict[str, Any] = {"product_id": PRODUCTS[a], "category": CATEGORIES[b]}
        elif kind == ADDED:
            fields = {"cart_id": f"cart-{user}-{a}", "product_id": PRODUCTS[b]}
        elif kind == SEARCHED:
            fields = {"query": QUERIES[a]}
        else:
            fields = {"cart_id": f"cart-{user}-{a}", "revenue": b}
        body = {"type": "track", "event": KIND_NAMES[kind], "userId": user_id, "properties": fields}
    body["messageId"] = f"bench-{seq:09d}"
    body["timestamp"] = format_iso(ms if at is None else at)
    body["context"] = CONTEXT
    return user_id.encode(), orjson.dumps(body)


def make_events(
    count: int, users: int, seed: int = SEED, workload: str = "realistic"
) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of `count` Segment events of `users` shoppers, in time order."""
    return list(generate(count, users, workload, seed).records())


# -- counting rules -----------------------------------------------------------------------


def counting_rules(definitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every `performed` condition with a `within` window in `definitions`, as a rule of
    `counting.Counter`: {"id", "event", "times", "window_ms", "where"}. `times` is the
    `gte` threshold (1 when absent); `where` a list of [property, op, value]."""
    rules: list[dict[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            body = node.get("performed")
            if isinstance(body, dict) and "event" in body and "within" in body:
                times = body.get("times") or {"gte": 1}
                window = parse_duration_ms(body["within"])
                if set(times) == {"gte"} and window is not None:
                    rules.append(
                        {
                            "id": path,
                            "event": body["event"],
                            "times": int(times["gte"]),
                            "window_ms": window,
                            "where": [
                                [w["property"], w["op"], w.get("value")]
                                for w in body.get("where") or []
                            ],
                        }
                    )
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    for doc in definitions:
        walk(doc["condition"], doc["key"])
    return rules
