"""The fault suite: whole `audiences worker` processes killed, stopped, scaled and
restarted while they replay a backlog, judged from outside against the pure core.

Each test produces the whole backlog before any worker runs (event times in the
past: the worker catches up on stream time, so the result is fully determined by the
log, SPEC §3), then checks with `faults.check_transitions`: exactly the transitions the
pure core implies, duplicates only with the same messageId and content, Entered and
Exited alternating per user and audience (SPEC §12 "Nothing lost").
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backlog import DEFINITIONS, H, history
from faults import (
    Announcements,
    EventProducer,
    OutputLog,
    WorkerHandle,
    apply_definitions_cli,
    check_transitions,
    diagnosed,
    expected_outputs,
    profile_of,
    slow_worker_env,
    two_workers_sharing,
)

from audiences.adapters.settings import Settings
from audiences.core.events import format_iso
from shared import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.system]

KILLS_PER_RUN = 5  # 4 runs: 20 kills, each test well under 90 s (a restart costs ~8 s)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def backlog(
    settings: Settings, tmp_path: Path, users: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Definitions applied, `users` shoppers' history on `events`; the expected outputs."""
    apply_definitions_cli(settings, DEFINITIONS, tmp_path)
    events = history(users, now_ms() - 12 * H)
    EventProducer(settings).send_all(events)
    return events, expected_outputs(DEFINITIONS, events, now_ms())


def assert_mid_stream(outputs: OutputLog, expected: dict[str, Any], what: str) -> None:
    """The only worker just stopped: once what it wrote is read, some expected output must
    be missing, or the fault did not land while it was processing (a test bug)."""
    outputs.settle(quiet_s=0.5)
    done = len(outputs.ids & set(expected))
    assert done < len(expected), f"{what} did not land mid-stream: all {done} outputs seen"


@pytest.mark.parametrize("run", range(4), ids=lambda r: f"kills-{5 * r + 1}-to-{5 * r + 5}")
def test_kill_9_at_random_points_gives_exactly_the_core_transitions(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    tmp_path: Path,
    run: int,
) -> None:
    """20 kill -9 at random moments of seeded runs (4 runs of 5 kills, to keep each test
    short), each followed by a restart: every other one with the data dir wiped (state
    rebuilt from the changelog), 10 of the 20 in all. In the end: exactly the pure
    core's transitions.

    Until the last kill, each batch of 5 events takes 2 ms longer (`slow_worker/`): at
    most 2,500 events/s whatever the host. A life lasts until /readyz is seen plus 0.2 s
    or 800 more outputs at most, so five cannot get through the 7,340 outputs of the
    14k-event backlog (about 2,000 at most, measured), and every kill lands mid-stream;
    at full speed, a fast CI host finished the backlog by the fifth kill. The
    checkpoint's writes run on threads of their own meanwhile: kills still land in them."""
    rng = random.Random(run)
    settings = fault_settings
    _events, expected = backlog(settings, tmp_path, users=3000)
    paced = tmp_path / "paced"
    paced.touch()
    env = {  # small batches: more batch boundaries to land in
        "AUDIENCES_BATCH_SIZE": "5",
        **slow_worker_env(2, while_exists=paced),
    }
    worker = fault_workers(**env).start()
    for kill in range(KILLS_PER_RUN * run + 1, KILLS_PER_RUN * (run + 1) + 1):
        worker.wait_ready()
        if rng.random() < 0.5:  # a random moment shortly after readiness
            time.sleep(rng.uniform(0.0, 0.2))
        else:  # after the outputs grew by a random number of records
            outputs.wait_for_growth(rng.randint(1, 800), timeout=60, alive=worker.alive)
        assert worker.alive(), f"worker died before kill {kill}:\n{worker.log_tail()}"
        worker.kill()
        assert_mid_stream(outputs, expected, f"kill {kill}")
        if kill % 2 == 0:
            shutil.rmtree(settings.data_dir, ignore_errors=True)
        worker = fault_workers(**env).start()
    paced.unlink()  # the last life drains at full speed
    worker.wait_ready()
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(worker):
        check_transitions(outputs.outputs, expected)


def unfinished_on(
    held: set[int], outputs: OutputLog, expected: dict[str, Any], partition_of: dict[str, int]
) -> set[int]:
    """Workers holding `held` just stopped: once what they wrote is read (outputs are keyed
    by user, so a user's outputs are on its partition), the partitions of `held` with
    expected outputs still missing: work that another worker has to take over."""
    outputs.settle(quiet_s=0.5, where=lambda m: m.partition() in held)
    return held & {partition_of[profile_of(o)] for m, o in expected.items() if m not in outputs.ids}


def assert_unfinished_on(
    held: set[int], outputs: OutputLog, expected: dict[str, Any], partition_of: dict[str, int]
) -> None:
    assert unfinished_on(held, outputs, expected, partition_of), (
        f"partitions {held} were done before their workers stopped: nothing to take over"
    )


def test_two_workers_one_killed_the_other_takes_over(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    announcements: Callable[[], Announcements],
    tmp_path: Path,
) -> None:
    """Two workers split the partitions; one is killed mid-stream: the survivor takes
    its partitions over (state from the changelog) and the result is exact. Both evaluate
    two events per batch, each batch 10 ms slower (`slow_worker/`) until the kill: at full
    speed the first worker could finish the backlog before the second one joins; slowed
    to the end, the survivor could not finish it within the wait (CI: 314 events left)."""
    rng = random.Random(3)
    settings = fault_settings
    apply_definitions_cli(settings, DEFINITIONS, tmp_path)
    events = history(3000, now_ms() - 12 * H)
    sent = EventProducer(settings).send_all(events)
    partition_of = {str(s.event["userId"]): s.partition for s in sent if s.event}
    expected = expected_outputs(DEFINITIONS, events, now_ms())
    slowed = tmp_path / "slowed"
    slowed.touch()
    env = {"AUDIENCES_BATCH_SIZE": "2", **slow_worker_env(10, while_exists=slowed)}
    (victim, survivor), owners = two_workers_sharing(
        fault_workers, announcements, tmp_path / "second-data", **env
    )
    outputs.wait_for_growth(rng.randint(1, 100), timeout=60, alive=victim.alive)
    held = owners.partitions_of(victim)
    victim.kill()
    assert_unfinished_on(held, outputs, expected, partition_of)
    slowed.unlink()
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(survivor):
        check_transitions(outputs.outputs, expected)
    survivor.assert_healthy("after taking over")
    assert owners.partitions_of(survivor) == {0, 1, 2}


def test_scale_1_2_3_then_back_to_1_worker(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    announcements: Callable[[], Announcements],
    tmp_path: Path,
) -> None:
    """Workers join one after another while the backlog is processed, then the first two
    stop with SIGTERM, one after the other: partitions move four times; the result is
    exact. The first two evaluate one event per batch, each batch 15 ms slower than it
    would be (`slow_worker/`: the backlog lasts through the joins), checkpointing after
    every turn; the third 50 per batch at full speed (it drains what is left once
    alone)."""
    settings = fault_settings
    apply_definitions_cli(settings, DEFINITIONS, tmp_path)
    events = history(4000, now_ms() - 12 * H)
    EventProducer(settings).send_all(events)
    expected = expected_outputs(DEFINITIONS, events, now_ms())
    workers: list[WorkerHandle] = []
    slow = slow_worker_env(pause_ms=15)
    for n, (batch, interval, pace) in enumerate(
        [("1", "0", slow), ("1", "0", slow), ("50", "100", {})]
    ):
        worker = fault_workers(
            str(tmp_path / f"data-{n}"),
            AUDIENCES_BATCH_SIZE=batch,
            AUDIENCES_COMMIT_INTERVAL_MS=interval,
            **pace,
        ).start()
        workers.append(worker)
        worker.wait_ready()
        # evaluating events after joining: it joined mid-stream
        wait_for(
            lambda w=worker: w.metric("audiences_events_in_total") > 0,
            60,
            f"worker {n + 1} evaluates events",
        )
    # One after the other: the embedded broker can leave the last member without the
    # partitions of two members that leave at once (reproduced with bare librdkafka
    # consumers), which is not what this test is about.
    owners = announcements()
    *leaving, survivor = workers
    codes, moved, stops = [], set(), []
    for n, worker in enumerate(leaving):
        held = owners.partitions_of(worker)
        stops.append(held)
        # Work left on what it holds, by its own consumer lag (asked before it stops: the
        # third worker drains a partition it takes over within a second).
        moved |= {p for p in held if worker.metric("audiences_consumer_lag", partition=str(p)) > 0}
        codes.append(worker.terminate(30))
        wait_for(
            lambda n=n: (
                set().union(*(owners.partitions_of(w) for w in workers[n + 1 :])) == {0, 1, 2}
            ),
            60,
            f"the partitions moved after stop {n + 1}",
        )
    assert moved, (
        f"the stopped workers had finished their partitions {stops}: nothing moved mid-stream"
    )
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(survivor):
        check_transitions(outputs.outputs, expected)
    survivor.assert_healthy("after the others left")
    assert codes == [0, 0], f"SIGTERM: exit codes {codes} (None: still running after 30 s)"


def test_sigterm_mid_stream_then_restart_emits_each_output_once(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    tmp_path: Path,
) -> None:
    """A clean stop makes everything it emitted durable: after SIGTERM mid-stream and a
    restart on the same data dir, every messageId is on `audience-events` exactly once."""
    rng = random.Random(4)
    settings = fault_settings
    _events, expected = backlog(settings, tmp_path, users=2000)
    env = {"AUDIENCES_BATCH_SIZE": "20"}
    worker = fault_workers(**env).start()
    worker.wait_ready()
    outputs.wait_for_growth(rng.randint(200, 800), timeout=60, alive=worker.alive)
    code = worker.terminate(30)
    assert_mid_stream(outputs, expected, "SIGTERM")
    restarted = fault_workers(**env).start()
    restarted.wait_ready()
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(restarted):
        check_transitions(outputs.outputs, expected, exactly_once=True)
    assert code == 0, f"SIGTERM: exit code {code} (None: still running after 30 s)"


ORDERED_TWICE = {
    "key": "ordered_twice",
    "condition": {"performed": {"event": "Order Completed", "times": {"gte": 2}}},
}


def test_paused_worker_cannot_corrupt_state(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    announcements: Callable[[], Announcements],
    tmp_path: Path,
) -> None:
    """A zombie: a worker frozen mid-stream (SIGSTOP, as in a long GC pause or a network
    partition) loses its partitions to the other worker, which goes on; then it wakes up
    (SIGCONT) in the middle of its batch. Whatever it writes then must not override the
    new owner's state: the result is exact, and so is everyone's next order after a
    restart that rebuilds all state from the changelog."""
    rng = random.Random(5)
    settings = fault_settings
    definitions = [*DEFINITIONS, ORDERED_TWICE]
    apply_definitions_cli(settings, definitions, tmp_path)
    events = history(3000, now_ms() - 24 * H)
    producer = EventProducer(settings)
    sent = producer.send_all(events)
    partition_of = {str(s.event["userId"]): s.partition for s in sent if s.event}
    expected = expected_outputs(definitions, events, now_ms())
    env = {"AUDIENCES_BATCH_SIZE": "5"}
    workers, owners = two_workers_sharing(
        fault_workers, announcements, tmp_path / "second-data", **env
    )
    zombie, survivor = workers
    outputs.wait_for_growth(rng.randint(1, 100), timeout=60, alive=zombie.alive)
    held = owners.partitions_of(zombie)
    assert zombie.proc is not None
    zombie.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: owners.partitions_of(survivor) == {0, 1, 2},
            60,
            "the survivor took the partitions",
        )
        # it goes on with them: the zombie's batch is old news once it wakes up
        outputs.wait_for_growth(
            600,
            timeout=60,
            alive=survivor.alive,
            where=lambda o: partition_of[profile_of(o)] in held,
        )
    finally:
        zombie.proc.send_signal(signal.SIGCONT)
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(*workers):
        check_transitions(outputs.outputs, expected)

    # Everyone orders once more; one worker rebuilds all state from the changelog.
    for worker in workers:
        worker.kill()
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    later = now_ms() - H
    more = [
        {
            "type": "track",
            "userId": user,
            "event": "Order Completed",
            "timestamp": format_iso(later + n),
            "messageId": f"again-{user}",
            "properties": {"cart_id": f"again-{user}"},
        }
        for n, user in enumerate(sorted(partition_of))
    ]
    producer.send_all(more)
    expected = expected_outputs(definitions, events + more, now_ms())
    rebuilt = fault_workers(**env).start()
    rebuilt.wait_ready()
    outputs.wait_for_ids(set(expected), timeout=90)
    with diagnosed(rebuilt):
        check_transitions(outputs.outputs, expected)
