"""The poison list, sent through Kafka to a real worker while normal users' events flow.

SPEC §2 and §11: bad input never stops a worker; user ids can never collide with the
engine's own keys; a record or profile that makes any code path fail is dead-lettered
or quarantined and the worker goes on; per-profile state is bounded and a changelog
record never exceeds the producer's message size.

Every test runs three lives of the worker over three phases of records, each phase
produced while no worker runs (a backlog: the worker replays it on stream time):
  1. a first start;
  2. SIGTERM, then a restart on the same data dir;
  3. kill -9, the data dir wiped (state rebuilt from the changelog), a restart.
After each life, the normal users' transitions so far must all be there and the
worker alive (process running, `/healthz` 200). At the end, normal users get exactly
the pure core's transitions; a poison record is either dead-lettered (with the
headers of README "Bad input") or handled as any other record: its profile then gets
exactly what the pure core gives for its records that were not dead-lettered.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from backlog import DEFINITIONS, H, M, history
from faults import (
    DeadLetter,
    DeadLetterLog,
    EventProducer,
    OutputLog,
    Sent,
    WorkerHandle,
    apply_definitions_cli,
    changelog_topic,
    check_alternation,
    check_transitions,
    diagnosed,
    expected_outputs,
    metric_samples,
    profile_of,
    read_whole_topic,
)

from audiences.adapters.settings import Settings
from audiences.core.events import format_iso, parse_event
from audiences.core.partitioning import partition_for
from audiences.errors import InvalidEventError

pytestmark = [pytest.mark.kafka, pytest.mark.system]

ORDERS = [
    {
        "key": f"orders_{n}",
        "condition": {"performed": {"event": "Order Completed", "times": {"gte": n}}},
    }
    for n in (1, 2, 3)
]
REVENUE_SUM = {
    "key": "revenue_sum_1h",
    "kind": "sum",
    "event": "Order Completed",
    "property": "revenue",
    "within": "1h",
}
BIG_SPENDERS = {
    "key": "big_spenders",
    "condition": {"computed": {"name": "revenue_sum_1h", "op": "gte", "value": 100}},
}
PHASES = 3
SHOPPERS_PER_PHASE = 150
KAFKA_MAX_MESSAGE_BYTES = 1_000_000  # Kafka's default message.max.bytes


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def phase_base(phase: int) -> int:
    """Phases are 12 h apart, all in the past: one phase's deadlines (windows of at most
    2 h) are over before the next phase's first event."""
    return now_ms() - (40 - 12 * phase) * H


def shoppers(phase: int, revenue: bool = False) -> list[dict[str, Any]]:
    """backlog.history's shoppers, renamed for the phase (each phase has its own users)."""
    rng = random.Random(phase)
    events = history(SHOPPERS_PER_PHASE, phase_base(phase))
    for event in events:
        event["userId"] = f"p{phase}-{event['userId']}"
        event["messageId"] = f"p{phase}-{event['messageId']}"
        if revenue and event["event"] == "Order Completed":
            event["properties"]["revenue"] = rng.choice([20, 60, 150])
    return events


def order(user: str, at_ms: int, tag: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": "Order Completed",
        "timestamp": format_iso(at_ms),
        "messageId": f"{tag}-{user[:40]}-{at_ms}",
        "properties": properties,
    }


def same_partition_as_marker(name: str, partitions: int) -> str:
    """A user named like `name` whose id lands in the partition of the id
    "\\0suppressed:<it>" (with the murmur2 partitioner the README asks for), so that a
    runtime keeping per-partition stores would see both in one store."""
    for n in range(1000):
        candidate = name if n == 0 else f"{name}-{n}"
        if partition_for(candidate.encode(), partitions) == partition_for(
            f"\x00suppressed:{candidate}".encode(), partitions
        ):
            return candidate
    raise AssertionError("no such name")


@dataclass
class Record:
    """A record to produce: an event (JSON-encoded with `json`, which keeps lone
    surrogates as escapes) or raw bytes, and its Kafka key."""

    value: dict[str, Any] | bytes
    key: bytes
    profile: str | None  # the profile it is for, if any
    # must be dead-lettered: True, or the reason SPEC names for it
    must_dlq: bool | str = False
    sent: Sent | None = None

    def raw(self) -> bytes:
        if isinstance(self.value, bytes):
            return self.value
        return json.dumps(self.value).encode()


def rec(event: dict[str, Any], key: bytes | None = None, must_dlq: bool | str = False) -> Record:
    profile = event.get("userId") or event.get("anonymousId")
    return Record(event, key if key is not None else str(profile).encode(), profile, must_dlq)


@dataclass
class Lives:
    """Three lives of a worker over three phases of records (see the module doc)."""

    settings: Settings
    make_worker: Callable[..., WorkerHandle]
    outputs: OutputLog
    dead_letters: DeadLetterLog
    work: Path
    definitions: list[dict[str, Any]]
    normal: Callable[[str], bool]  # profiles that must get exactly the core's outputs
    records: list[Record] = field(default_factory=list)
    worker: WorkerHandle | None = None

    def live(
        self,
        phase: int,
        records: Iterable[Record],
        definitions: list[dict[str, Any]] | None = None,
    ) -> None:
        """Produce the phase's records with no worker running, then start the phase's life
        and wait for the normal users' outputs so far. `definitions` are applied before
        the phase's records (they must change no output: the expected outputs are
        computed with the first life's definitions)."""
        records = list(records)
        if phase == 0:
            apply_definitions_cli(self.settings, self.definitions, self.work)
        elif phase == 1:
            assert self.worker is not None
            self.worker.terminate()
        elif phase == 2:
            assert self.worker is not None
            self.worker.kill()
            shutil.rmtree(self.settings.data_dir, ignore_errors=True)
        if definitions:
            apply_definitions_cli(self.settings, definitions, self.work)
        producer = EventProducer(self.settings)
        for record in records:
            record.sent = producer.send(record.raw(), record.key)
        producer.flush()
        self.records += records
        self.worker = self.make_worker().start()
        self.worker.wait_ready()
        want = set(self.expected_normal())
        self.outputs.wait_for_ids(want, timeout=60, alive=self.worker.alive)
        self.worker.assert_healthy(f"in life {phase + 1}")
        missing = want - self.outputs.ids
        assert not missing, (
            f"life {phase + 1}: {len(missing)} of {len(want)} normal users' outputs missing"
        )

    def accepted_by_core(self, record: Record) -> bool:
        try:
            parse_event(record.raw(), now_ms())
        except InvalidEventError:
            return False
        return True

    def expected_for(self, records: Iterable[Record]) -> dict[str, dict[str, Any]]:
        """The pure core's outputs for `records`, but those it cannot read."""
        events = [orjson.loads(r.raw()) for r in records if self.accepted_by_core(r)]
        return expected_outputs(self.definitions, events, now_ms())

    def normal_records(self) -> list[Record]:
        return [r for r in self.records if r.profile and self.normal(r.profile)]

    def expected_normal(self) -> dict[str, dict[str, Any]]:
        return self.expected_for(r for r in self.normal_records() if not r.must_dlq)

    def letters(self) -> dict[tuple[int, int], DeadLetter]:
        self.dead_letters.settle(quiet_s=1.0)
        return self.dead_letters.by_source()

    def check_normal_users(self) -> None:
        assert not self.outputs.undecodable, (
            f"outputs that are not JSON: {self.outputs.undecodable[:3]}"
        )
        normal = [o for o in self.outputs.outputs if self.normal(profile_of(o))]
        check_transitions(normal, self.expected_normal())
        check_alternation(self.outputs.outputs)
        letters = self.letters()
        parked = [
            r.profile for r in self.normal_records() if not r.must_dlq and where(r) in letters
        ]
        assert not parked, f"normal users' events dead-lettered: {parked[:5]}"
        problems = []
        ours = {where(r): r for r in self.records}
        for source, letter in letters.items():  # whatever was dead-lettered, and why
            if source in ours:
                try:
                    self.check_dead_letter(ours[source], letter, None)
                except AssertionError as exc:
                    problems.append(str(exc))
        for record in self.records:
            if not record.must_dlq:
                continue
            letter = letters.get(where(record))
            if letter is None:
                problems.append(f"not dead-lettered: {record.raw()[:120]!r}")
                continue
            reason = record.must_dlq if isinstance(record.must_dlq, str) else None
            try:
                self.check_dead_letter(record, letter, reason)
            except AssertionError as exc:
                problems.append(str(exc))
        assert not problems, "\n".join(problems)

    def check_dead_letter(self, record: Record, letter: DeadLetter, reason: str | None) -> None:
        """README "Bad input": original bytes and key, headers naming the source and why."""
        assert record.sent is not None
        h = letter.headers
        assert letter.value == record.sent.value and letter.key == record.key, (
            f"the DLQ must hold the original record: {letter}"
        )
        assert h.get("source_topic") == self.settings.events_topic, h
        assert h.get("error"), f"no `error` header: {h}"
        assert h.get("error_reason"), f"no `error_reason` header: {h}"
        if reason is not None:
            assert h["error_reason"] == reason, f"{record.raw()[:80]!r}: {h}"


def where(record: Record) -> tuple[int, int]:
    assert record.sent is not None
    return record.sent.partition, record.sent.offset


@pytest.fixture
def lives(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    dead_letters: DeadLetterLog,
    tmp_path: Path,
) -> Callable[..., Lives]:
    def make(definitions: list[dict[str, Any]], normal: Callable[[str], bool]) -> Lives:
        return Lives(
            fault_settings, fault_workers, outputs, dead_letters, tmp_path, definitions, normal
        )

    return make


# -- user ids ---------------------------------------------------------------------------------

ALICE = same_partition_as_marker("alice", 3)
POISON_IDS = [
    "\x00meta:counts",
    "__batch__:x",
    f"\x00suppressed:{ALICE}",
    "__fence__",
    "\x00",
    "u" * 10_000,
]
BAD_UTF8_KEY = b"bad-\xff\xfe-utf8"


def bad_utf8_records(phase: int, at_ms: int) -> list[Record]:
    """Invalid UTF-8 as the Kafka key, with the "same" userId: (a) the same bytes raw in
    the JSON (not UTF-8: undecodable), (b) as the lone surrogates Python's surrogateescape
    makes of them (escaped in the JSON), (c) as the characters of those bytes in Latin-1
    (valid JSON, a key that is not the UTF-8 of the userId)."""
    tag = f"p{phase}-bad"
    raw = order("bad-XX-utf8", at_ms, tag + "a")
    raw_bytes = json.dumps(raw).encode().replace(b"bad-XX-utf8", BAD_UTF8_KEY)
    escaped = order(BAD_UTF8_KEY.decode("utf-8", "surrogateescape"), at_ms, tag + "b")
    latin = order(BAD_UTF8_KEY.decode("latin-1"), at_ms, tag + "c")
    return [
        Record(raw_bytes, BAD_UTF8_KEY, None),
        Record(escaped, BAD_UTF8_KEY, None),
        Record(latin, BAD_UTF8_KEY, latin["userId"]),
    ]


def in_phases(profile: str) -> bool:
    """Users of the phases (shoppers and others named p<phase>-...): ordinary ids."""
    return profile.startswith(tuple(f"p{phase}-" for phase in range(PHASES)))


def is_normal(profile: str) -> bool:
    """The phases' shoppers and ALICE: users that must get exactly the core's outputs."""
    return profile == ALICE or in_phases(profile)


def test_user_ids_never_collide_with_the_engines_keys(lives: Callable[..., Lives]) -> None:
    """Ids shaped like the engine's own keys (state meta, batch markers, suppression
    markers, fences), NUL, a 10,000-character id, invalid UTF-8: each is a normal
    profile or dead-lettered; none crashes the worker or makes another user look
    deleted (ALICE orders in every life, after "\\0suppressed:ALICE" did)."""
    run = lives(DEFINITIONS + ORDERS, is_normal)
    for phase in range(PHASES):
        at = phase_base(phase) + 8 * H
        records = [rec(e) for e in shoppers(phase)]
        records.append(rec(order(ALICE, at, f"p{phase}")))
        records += [rec(order(user, at + M, f"p{phase}")) for user in POISON_IDS]
        records += bad_utf8_records(phase, at + 2 * M)
        run.live(phase, records)

    run.check_normal_users()
    assert sum(o["event"] == "Audience Entered" for o in run.outputs.of(ALICE)) == 3
    letters = run.letters()
    problems = []
    for profile in [*POISON_IDS, BAD_UTF8_KEY.decode("latin-1"), None]:
        records = [r for r in run.records if r.profile == profile]
        parked = [r for r in records if where(r) in letters]
        for record in parked:
            run.check_dead_letter(record, letters[where(record)], None)
        kept = [r for r in records if where(r) not in letters]
        unreadable = [r for r in kept if not run.accepted_by_core(r)]
        if unreadable:
            problems.append(
                f"{len(unreadable)} unreadable records not dead-lettered, e.g. "
                f"{unreadable[0].raw()[:60]!r}"
            )
        if profile is not None:
            try:
                check_transitions(run.outputs.of(profile), run.expected_for(kept))
            except AssertionError as exc:
                problems.append(
                    f"{profile[:30]!r} ({len(parked)} of {len(records)} dead-lettered): {exc}"
                )
    assert not problems, "\n".join(problems)


# -- event times and bad input ----------------------------------------------------------------

BAD_TIMES: dict[str, Any] = {
    "1e20": 1e20,  # epoch ms beyond 64 bits
    "minus-1": -1,  # a number: the schema wants an ISO-8601 string (schemas/events/common.json)
    "1e400": "<1e400>",  # written raw below: beyond any double
    "year-99999": "99999-01-01",  # not an ISO-8601 date
}


def bad_time_records(phase: int, at: int) -> list[Record]:
    """Per bad time, a user who orders, sends the bad event, orders again: the bad one
    is dead-lettered and the user goes on as if it never came."""
    records = []
    for name, value in {**BAD_TIMES, "future": None}.items():
        user = f"p{phase}-ts-{name}"
        bad = order(user, at + M, f"p{phase}-bad")
        if name == "future":  # SPEC §11: > 24 h after the record's time: future_timestamp
            bad["timestamp"] = format_iso(now_ms() + 48 * H)
            bad_record = rec(bad, must_dlq="future_timestamp")
        else:
            bad["timestamp"] = value
            raw = json.dumps(bad).encode().replace(b'"<1e400>"', b"1e400")
            bad_record = Record(raw, user.encode(), user, must_dlq=True)
        records += [rec(order(user, at, f"p{phase}")), bad_record]
        records.append(rec(order(user, at + 2 * M, f"p{phase}")))
    return records


def bad_input_records(phase: int, at: int) -> list[Record]:
    """Bad input whose reason SPEC §2 names: undecodable, oversized (> 32 KB), missing_user."""
    junk = f"p{phase}-junk"
    big = order(f"p{phase}-big", at, f"p{phase}", padding="x" * (33 * 1024))
    nobody = order("nobody", at, f"p{phase}")
    del nobody["userId"]
    return [
        Record(
            b'{"type": "track", "userId": "' + junk.encode() + b'", "ev',
            junk.encode(),
            junk,
            "undecodable",
        ),
        rec(big, must_dlq="oversized"),
        rec(nobody, key=f"p{phase}-nobody".encode(), must_dlq="missing_user"),
    ]


def test_bad_times_and_bad_input_are_dead_lettered_and_the_worker_goes_on(
    lives: Callable[..., Lives],
) -> None:
    """Timestamps 1e20, -1, 1e400, "99999-01-01" and 48 h ahead, undecodable, oversized
    and user-less records, in every life: each is dead-lettered with the original bytes
    and the README's headers (the SPEC-named reasons exactly), counted in
    audiences_events_invalid_total{reason}; the users they were for, and everyone else,
    get exactly the pure core's transitions."""
    run = lives(DEFINITIONS + ORDERS, in_phases)
    for phase in range(PHASES):
        at = phase_base(phase) + 8 * H
        records = [rec(e) for e in shoppers(phase)]
        records += bad_time_records(phase, at) + bad_input_records(phase, at)
        run.live(phase, records)
    run.check_normal_users()
    assert run.worker is not None
    invalid = {
        labels["reason"]: value
        for labels, value in metric_samples(run.worker.metrics(), "audiences_events_invalid_total")
    }
    for reason in ("undecodable", "oversized", "missing_user", "future_timestamp"):
        assert invalid.get(reason, 0) >= 1, (
            f"audiences_events_invalid_total{{reason={reason}}}: {invalid}"
        )
    assert sum(invalid.values()) >= 8, invalid  # the last life's 8 bad records at least


# -- computed trait reaching infinity ----------------------------------------------------------


# An audience nobody qualifies for: applying it changes the catalog (every stored profile
# is judged again on it, SPEC §3) and no output.
NOBODY = {"key": "nobody", "condition": {"performed": {"event": "Never Sent"}}}


def test_sum_trait_reaching_infinity_breaks_nothing(lives: Callable[..., Lives]) -> None:
    """A windowed sum trait over revenues of 1e308 (two of them: inf) for one user per
    life, and one whose infinite sum is carried across restarts; later events of other
    users move stream time past the window; before the second life a new definition has
    every stored profile judged again. No crash; everyone else exact."""
    definitions = DEFINITIONS + ORDERS + [REVENUE_SUM, BIG_SPENDERS]
    run = lives(definitions, in_phases)
    for phase in range(PHASES):
        at = phase_base(phase) + 8 * H
        records = [rec(e) for e in shoppers(phase, revenue=True)]
        for user in (f"inf-{phase}", "inf-across-lives"):  # 1 s apart: one bucket of the sum
            records += [rec(order(user, at + n * 1000, f"p{phase}", revenue=1e308)) for n in (0, 1)]
        # other users, later: stream time passes the 1 h window of the sums above
        records += [
            rec(order(f"p{phase}-later-{n}", at + (70 + 10 * n) * M, f"p{phase}", revenue=150))
            for n in range(6)
        ]
        run.live(phase, records, [*definitions, NOBODY] if phase == 1 else None)
    run.check_normal_users()


# -- a profile that would grow without bound --------------------------------------------------

WIDE = "wide-traits"


def wide_event(n: int, at: int) -> dict[str, Any]:
    """An event of ~30 KB (under the 32 KB limit) of context.traits no other event has."""
    traits = {f"e{n:02d}_t{t:02d}": f"{n}-{t}-" + "v" * 960 for t in range(30)}
    event = {
        "type": "track",
        "userId": WIDE,
        "event": "Settings Changed",
        "timestamp": format_iso(at),
        "messageId": f"wide-{n}",
        "context": {"traits": traits},
    }
    assert 29_000 < len(json.dumps(event)) < 32 * 1024
    return event


def test_profile_with_huge_traits_stays_bounded(
    lives: Callable[..., Lives], fault_settings: Settings
) -> None:
    """One user sends 40 events of 30 KB of distinct context.traits over the three lives:
    the worker keeps running, everyone else is exact, and no record of the state
    changelog reaches Kafka's 1 MB message limit."""
    run = lives(DEFINITIONS + ORDERS, in_phases)
    counts = [14, 13, 13]
    sent = 0
    for phase in range(PHASES):
        at = phase_base(phase) + 8 * H
        records = [rec(e) for e in shoppers(phase)]
        records += [rec(wide_event(sent + n, at + n * M)) for n in range(counts[phase])]
        sent += counts[phase]
        run.live(phase, records)
    assert sent == 40
    run.check_normal_users()
    changelog = read_whole_topic(fault_settings, changelog_topic(fault_settings))
    assert changelog, "the state changelog is empty"
    sizes = sorted(len(m.value() or b"") + len(m.key() or b"") for m in changelog)
    assert sizes[-1] < KAFKA_MAX_MESSAGE_BYTES, f"changelog records of {sizes[-3:]} bytes"


# -- a crash must not skip records ---------------------------------------------------------------


def test_records_around_a_poison_record_are_never_skipped(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    dead_letters: DeadLetterLog,
    tmp_path: Path,
) -> None:
    """Records that once crashed a worker (a timestamp of 1e20, a user id equal to an
    internal key) in the middle of a backlog, in batches of 50. A worker should not die
    on them (the tests above); if one does, a restart on the same data dir must go on
    where its durable state is, never past the records of the batch it died in (a
    committed input offset is never ahead of durable state). Up to three lives: the
    normal users' outputs are exactly the core's, the 1e20 record is dead-lettered."""
    settings = fault_settings
    apply_definitions_cli(settings, DEFINITIONS, tmp_path)
    events = shoppers(0)
    poison = order("ts-1e20", phase_base(0) + 3 * H, "poison")
    poison["timestamp"] = 1e20
    third = len(events) // 3
    producer = EventProducer(settings)
    for event in events[:third]:
        producer.send(event)
    bad = producer.send(poison)
    for event in events[third : 2 * third]:
        producer.send(event)
    producer.send(order("\x00meta:counts", phase_base(0) + 4 * H, "poison"))
    for event in events[2 * third :]:
        producer.send(event)
    producer.flush()
    expected = expected_outputs(DEFINITIONS, events, now_ms())
    deaths = []
    for life in range(3):
        worker = fault_workers(AUDIENCES_BATCH_SIZE="50").start()
        worker.wait_ready()
        outputs.wait_for_ids(set(expected), timeout=30, alive=worker.alive)
        if worker.alive():
            break
        deaths.append(f"life {life + 1}: {worker.log_tail(3)}")
    normal = [o for o in outputs.outputs if in_phases(profile_of(o))]
    with diagnosed(worker, note=f"the worker died {len(deaths)} times (restarted each time)"):
        check_transitions(normal, expected)
    dead_letters.settle()
    assert (bad.partition, bad.offset) in dead_letters.by_source(), "1e20 not dead-lettered"
    assert not deaths, f"the worker died on bad input (nothing lost though): {deaths}"
