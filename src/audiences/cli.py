"""The `audiences` command (SPEC §8). `audiences COMMAND --help` documents each."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from audiences import __version__, core_build, logs
from audiences.adapters.settings import (
    Settings,
    SettingsError,
    settings_or_exit,
    warn_unknown_variables,
)
from audiences.errors import ApiError, AudiencesError, DefinitionError

MEMBERS_PAGE = 500  # members asked per request by `audiences members`


def _settings() -> Settings:
    return Settings.from_env()


def _require_bootstrap(settings: Settings) -> Settings:
    if not settings.kafka_bootstrap:
        raise SystemExit(
            "error: AUDIENCES_KAFKA_BOOTSTRAP is not set (use `audiences up` for an embedded broker)"
        )
    return settings


def load_documents(path: Path) -> list[tuple[str, Any]]:
    """(source, document) for a JSON/YAML file or every such file of a directory."""
    import yaml

    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    documents: list[tuple[str, Any]] = []
    for file in files:
        text = file.read_text()
        try:
            data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise SystemExit(f"error: {file}: cannot parse: {exc}") from None
        except RecursionError:  # both parsers recurse per level (definitions: at most 32)
            raise SystemExit(f"error: {file}: cannot parse: nested too deeply") from None
        for doc in data if isinstance(data, list) else [data]:
            documents.append((str(file), doc))
    return documents


# -- commands -----------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    if args.apache:
        return _apache_broker(args)
    from audiences.adapters.kafka.embedded import EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        print(broker.bootstrap, flush=True)
        print(f"export AUDIENCES_KAFKA_BOOTSTRAP={broker.bootstrap}", file=sys.stderr, flush=True)
        _wait_for_signal()
    return 0


def _apache_broker(args: argparse.Namespace) -> int:
    from audiences.adapters.kafka.apache import ApacheKafka

    # Starting takes seconds (a minute when Maven first fetches the jars): a
    # SIGTERM meanwhile unwinds like Ctrl-C, so `start` stops what it began.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    broker = ApacheKafka(port=args.port)
    print(
        f"starting Apache Kafka {broker.kafka_version} (KRaft, Java, jars from Maven)...",
        file=sys.stderr,
        flush=True,
    )
    with broker:
        print(broker.bootstrap, flush=True)
        print(f"broker log: {broker.log_path}", file=sys.stderr, flush=True)
        print(f"export AUDIENCES_KAFKA_BOOTSTRAP={broker.bootstrap}", file=sys.stderr, flush=True)
        _wait_for_signal()
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _with_destinations(settings: Settings, path: str | None) -> Settings:
    """`--destinations FILE` overrides AUDIENCES_DESTINATIONS; the file is validated now."""
    from audiences.adapters.sinks.config import load_destinations

    if path or settings.destinations:
        settings = settings.replace(destinations=os.path.abspath(path or settings.destinations))
        for destination in load_destinations(settings.destinations, os.environ):
            where = destination.topic if destination.type == "kafka" else destination.url
            print(f"  destination {destination.name} ({destination.type}) -> {where}", flush=True)
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    from audiences.bootstrap import run_worker

    settings = _with_destinations(_require_bootstrap(_settings()), args.destinations)
    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_collector(args: argparse.Namespace) -> int:
    from audiences.bootstrap import run_collector

    settings = _require_bootstrap(_settings())
    if not settings.write_key_list():
        raise SystemExit("error: AUDIENCES_WRITE_KEYS is not set (comma-separated write keys)")
    run_collector(settings)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import secrets

    from audiences.bootstrap import broker_for, run_worker

    settings = _with_destinations(_settings(), args.destinations)
    if not settings.write_key_list():  # a key for this session only, shown once
        settings = settings.replace(write_keys=secrets.token_urlsafe(16))
    with broker_for(settings) as settings:
        print(f"Kafka bootstrap: {settings.kafka_bootstrap}", flush=True)
        print(
            f"Collector: http://{settings.collector_host}:{settings.collector_port}"
            f"  write key: {settings.write_key_list()[0]}",
            flush=True,
        )
        run_worker(settings, loglevel=args.loglevel, with_collector=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from audiences.tools.demo.runner import run_demo

    settings = _with_destinations(_settings(), args.destinations)
    return run_demo(
        users=args.users,
        duration_s=args.duration,
        hour_ms=args.hour_ms,
        destinations=settings.destinations,
        seed=args.seed,
    )


def cmd_apply(args: argparse.Namespace) -> int:
    from audiences.adapters.stream.definitions import apply_definitions
    from audiences.bootstrap import prepared

    settings = _require_bootstrap(_settings())
    documents = load_documents(Path(args.file))
    topics = prepared(settings)
    try:
        results = apply_definitions(settings, topics, [doc for _, doc in documents])
    except DefinitionError as exc:
        source = documents[0][0] if len(documents) == 1 else args.file
        print(f"error: {source}: {exc}", file=sys.stderr)
        return 2
    for key, version in results:
        print(f"{key}: " + (f"applied as version {version}" if version else "unchanged"))
    if args.wait:
        return _wait_for_backfill(settings, topics, args.timeout)
    return 0


def _wait_for_backfill(settings: Settings, topics: Any, timeout_s: float) -> int:
    """A progress bar of the workers' backfill (replay of retained events), on a terminal."""
    from audiences.adapters.stream.definitions import wait_for_backfill
    from audiences.progress import ProgressBar

    bar = ProgressBar("backfill")

    def show(done: int, total: int, finished: int, partitions: int) -> None:
        bar.update(done, total, f"{finished}/{partitions} partitions done")

    try:
        ok = wait_for_backfill(settings, topics, timeout_s, show)
    finally:
        bar.close()
    if not ok:
        print(
            f"error: backfill not finished after {timeout_s:.0f}s (are workers running?)",
            file=sys.stderr,
        )
        return 1
    print("backfill done: the audiences reflect the retained history")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    documents = load_documents(Path(args.file))
    url = _api_url(args)
    reports = (
        _preview_via_api(url, _api_token(args), documents, args.sample)
        if url
        else _preview(documents, args)
    )
    if reports is None:
        return 2
    for report in reports:
        if args.json:
            print(json.dumps({k: v for k, v in report.items() if k != "current_version"}))
            continue
        current = report["current_version"]
        change = f"v{current} -> v{report['version']}" if current else "new, v1"
        print(f"{report['key']} ({change}), judged on {report['profiles']} stored profiles:")
        print(f"  size after applying: {report['size']}")
        print(f"  would enter: {report['entering']}  {' '.join(report['would_enter'])}")
        print(f"  would exit:  {report['exiting']}  {' '.join(report['would_exit'])}")
        print(f"  sample: {json.dumps(report['sample'])}")
    return 0


def _preview(documents: list[tuple[str, Any]], args: argparse.Namespace) -> list[Any] | None:
    """Preview reports computed here, reading definitions and profiles from Kafka."""
    from audiences.adapters.stream.definitions import read_definitions, read_profiles
    from audiences.bootstrap import prepared
    from audiences.core.definitions import check_references, validate_definition
    from audiences.core.preview import preview

    settings = _require_bootstrap(_settings())
    checked = []
    for source, raw in documents:  # before reading Kafka: limits, shape, patterns
        try:
            checked.append((source, validate_definition(raw)))
        except DefinitionError as exc:
            print(f"error: {source}: {exc}", file=sys.stderr)
            return None
    topics = prepared(settings)
    definitions = read_definitions(settings, topics)
    profiles = read_profiles(settings, topics)
    reports = []
    for source, doc in checked:
        try:
            others = {k: d for k, (d, _) in definitions.items() if k != doc["key"]}
            check_references(doc, others)
            report = preview(doc, definitions, profiles.items(), args.sample).as_json()
        except DefinitionError as exc:
            print(f"error: {source}: {exc}", file=sys.stderr)
            return None
        current = definitions.get(doc["key"])
        reports.append({**report, "current_version": current[1] if current else None})
    return reports


def _preview_via_api(
    url: str, token: str, documents: list[tuple[str, Any]], sample: int
) -> list[Any] | None:
    from audiences.adapters.http.client import ApiClient

    client = ApiClient(url, token=token)
    reports = []
    for source, doc in documents:
        try:
            reports.append(client.request("POST", "/v1/audiences/preview", doc, {"sample": sample}))
        except ApiError as exc:
            if exc.status != 422:
                raise
            print(f"error: {source}: {exc}", file=sys.stderr)
            return None
    return reports


def cmd_get(args: argparse.Namespace) -> int:
    url = _api_url(args)
    if url:
        return _get_via_api(url, _api_token(args), args.key)
    from audiences.adapters.stream.definitions import read_definitions
    from audiences.bootstrap import prepared

    settings = _require_bootstrap(_settings())
    definitions = read_definitions(settings, prepared(settings))
    if args.key:
        if args.key not in definitions:
            print(f"error: no audience {args.key!r}", file=sys.stderr)
            return 1
        doc, _version = definitions[args.key]
        print(json.dumps(doc, indent=2))
    else:
        for key, (doc, version) in sorted(definitions.items()):
            print(f"{key}\tv{version}\t{doc.get('name', '')}")
    return 0


def _get_via_api(url: str, token: str, key: str | None) -> int:
    from audiences.adapters.http.client import ApiClient, quote

    client = ApiClient(url, token=token)
    if key is None:
        listed = client.get("/v1/audiences")["audiences"] + client.get("/v1/traits")["traits"]
        for item in sorted(listed, key=lambda item: item["key"]):
            print(f"{item['key']}\tv{item['version']}\t{item.get('name', '')}")
        return 0
    for kind in ("audiences", "traits"):
        try:
            print(json.dumps(client.get(f"/v1/{kind}/{quote(key)}"), indent=2))
            return 0
        except ApiError as exc:
            if exc.status != 404:
                raise
    print(f"error: no audience {key!r}", file=sys.stderr)
    return 1


def cmd_members(args: argparse.Namespace) -> int:
    from audiences.adapters.http.client import ApiClient, quote

    client = ApiClient(_require_api_url(args, "members"), token=_api_token(args))
    printed = 0
    cursor = None
    while args.limit is None or printed < args.limit:
        want = MEMBERS_PAGE if args.limit is None else min(MEMBERS_PAGE, args.limit - printed)
        page = client.get(f"/v1/audiences/{quote(args.key)}/members", limit=want, cursor=cursor)
        for member in page["members"][:want]:
            print(f"{member['id']}\t{member['entered_at']}")
            printed += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from audiences.adapters.http.client import ApiClient, quote
    from audiences.adapters.http.history import render

    client = ApiClient(_require_api_url(args, "history"), token=_api_token(args))
    points = client.get(
        f"/v1/audiences/{quote(args.key)}/history",
        **{"from": args.start, "to": args.end, "step": args.step},
    )
    print(render(args.key, points))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from audiences.adapters.http.client import ApiClient, quote

    client = ApiClient(_require_api_url(args, "explain"), token=_api_token(args))
    print(
        json.dumps(client.get(f"/v1/users/{quote(args.user)}/explain/{quote(args.key)}"), indent=2)
    )
    return 0


def _api_url(args: argparse.Namespace) -> str:
    return str(args.url or _settings().api_url)


def _api_token(args: argparse.Namespace) -> str:
    """--token, else AUDIENCES_API_TOKEN (empty: the API has no tokens configured)."""
    return str(args.token or _settings().api_token)


def _require_api_url(args: argparse.Namespace, command: str) -> str:
    url = _api_url(args)
    if not url:
        raise SystemExit(
            f"error: `audiences {command}` reads the workers' state through their API: "
            "give --url http://WORKER:6066 or set AUDIENCES_API_URL"
        )
    return url


def cmd_delete(args: argparse.Namespace) -> int:
    from audiences.adapters.stream.definitions import delete_definition
    from audiences.bootstrap import prepared

    settings = _require_bootstrap(_settings())
    if not delete_definition(settings, prepared(settings), args.key):
        print(f"error: no audience {args.key!r}", file=sys.stderr)
        return 1
    print(f"{args.key}: deleted")
    return 0


def cmd_users_delete(args: argparse.Namespace) -> int:
    """`DELETE /v1/users/{id}` (SPEC §4/§8, scope `admin`), after a confirmation."""
    from audiences.adapters.http.client import ApiClient, quote

    url = _require_api_url(args, "users delete")
    user = args.id
    if not args.yes:
        question = (
            f"Delete user {user!r}: exit their audiences, erase their state and linked "
            "anonymous profiles, drop their later events, and tell every destination "
            "(User Deleted)? [y/N] "
        )
        try:
            answer = input(question)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print(f"{user}: not deleted", file=sys.stderr)
            return 1
    client = ApiClient(url, token=_api_token(args))
    client.request("DELETE", f"/v1/users/{quote(user)}")
    print(
        f"{user}: deletion accepted: the worker owning it exits their audiences, erases "
        "their state and linked anonymous profiles, and emits `User Deleted` for the "
        "destinations"
    )
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from audiences.tools.tail import tail

    settings = _require_bootstrap(_settings())
    tail(settings, from_beginning=args.from_beginning, limit=args.limit, as_json=args.json)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    for name, entry in _settings().redacted().items():
        print(f"{name}={entry['value']}\t# {entry['doc']}")
    return 0


def _destination(settings: Settings, name: str) -> Any:
    from audiences.adapters.sinks.config import load_destinations

    if not settings.destinations:
        raise SystemExit("error: AUDIENCES_DESTINATIONS is not set (the destinations file)")
    destinations = {d.name: d for d in load_destinations(settings.destinations, os.environ)}
    if name not in destinations:
        known = ", ".join(sorted(destinations)) or "none"
        raise SystemExit(f"error: no destination {name!r} in {settings.destinations} ({known})")
    return destinations[name]


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from audiences.bootstrap import replay_destination_dead_letters
    from audiences.core.durations import parse_duration_ms

    settings = _require_bootstrap(_settings())
    destination = _destination(settings, args.destination)
    max_age_ms = parse_duration_ms(args.max_retry_age)
    if not max_age_ms:
        raise SystemExit(
            f"error: --max-retry-age: expected a duration like '1m', got {args.max_retry_age!r}"
        )
    report = replay_destination_dead_letters(
        settings,
        destination,
        from_beginning=args.from_beginning,
        max_retry_age_ms=max_age_ms,
    )
    print(
        f"{destination.name}: {report.found} dead letters replayed: {report.delivered} delivered, "
        f"{report.skipped} skipped, {report.dead_lettered} dead-lettered again"
        + (f", {report.invalid} not JSON (left in the DLQ)" if report.invalid else "")
    )
    return 0 if report.dead_lettered == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from audiences.tools.bench.runner import run_bench

    skip = {
        name
        for name, flag in (
            ("quix", args.skip_quix),
            ("faust_table", args.skip_faust),
            ("plain_loop", args.skip_plain),
            ("latency", args.skip_latency),
            ("recovery", args.skip_recovery),
            ("memory", args.skip_memory),
        )
        if flag
    }
    return run_bench(
        events=args.events,
        users=args.users,
        audiences=args.audiences,
        partitions=args.partitions,
        as_json=args.json,
        workload=args.workload,
        broker=args.broker,
        skip=skip,
        faust_events=args.faust_events,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        latency_warmup=args.latency_warmup,
        memory_profiles=args.memory_profiles,
    )


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _destinations_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--destinations",
        metavar="FILE",
        default=None,
        help="destinations file (YAML/JSON, SPEC §6) to deliver transitions to; "
        "overrides AUDIENCES_DESTINATIONS",
    )


def _url_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"management API base URL, e.g. http://127.0.0.1:6066 (default: "
        f"AUDIENCES_API_URL): {text}",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="management API bearer token (default: AUDIENCES_API_TOKEN); needed when the "
        "workers have AUDIENCES_API_TOKENS",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiences",
        description="Real-time audience engine: Segment events in, live audiences out. "
        "Settings come from AUDIENCES_* environment variables (`audiences config`).",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"audiences {__version__} (core: {core_build().describe()})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    text = (
        "start the embedded Kafka-compatible broker (Tansu, in memory) and print its "
        "bootstrap address; Ctrl-C or SIGTERM stops it"
    )
    p = sub.add_parser(
        "broker",
        help="start the embedded Kafka-compatible broker and print its address",
        description=text,
    )
    p.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    p.add_argument(
        "--apache",
        action="store_true",
        help="start a real Apache Kafka 4.x broker instead (KRaft, one node, storage in a "
        "temporary directory removed on stop): needs Java >= 17, and Maven the first time, "
        "which fetches org.apache.kafka:kafka_2.13 from Maven Central into ~/.m2 (the "
        "classpath is cached in ~/.cache/audiences); AUDIENCES_APACHE_KAFKA_VERSION picks "
        "another release",
    )
    p.set_defaults(func=cmd_broker)

    for name, func, text in (
        ("worker", cmd_worker, "run an evaluator worker against AUDIENCES_KAFKA_BOOTSTRAP"),
        (
            "up",
            cmd_up,
            "run a worker and the HTTP collector, with an embedded broker unless "
            "AUDIENCES_KAFKA_BOOTSTRAP is set (a write key is generated unless "
            "AUDIENCES_WRITE_KEYS is set)",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--loglevel", default="info", help="log level (default: info)")
        _destinations_option(p)
        p.set_defaults(func=func)

    text = (
        "run the Segment-compatible HTTP collector (POST /v1/track, /v1/batch, ...) on "
        "AUDIENCES_COLLECTOR_HOST:AUDIENCES_COLLECTOR_PORT, producing to AUDIENCES_EVENTS_TOPIC"
    )
    p = sub.add_parser(
        "collector", help="run the Segment-compatible HTTP collector", description=text
    )
    p.set_defaults(func=cmd_collector)

    p = sub.add_parser(
        "demo", help="run everything and play a generated shop, printing live audiences"
    )
    p.add_argument("--users", type=int, default=40, help="shoppers to simulate (default 40)")
    p.add_argument(
        "--duration", type=float, default=None, help="stop after N seconds (default: Ctrl-C)"
    )
    p.add_argument(
        "--hour-ms",
        type=int,
        default=5_000,
        help="how long one shop 'hour' lasts in ms (default 5000)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the generated shop, to replay the same traffic (default: the clock)",
    )
    _destinations_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("apply", help="validate and publish audience definitions")
    p.add_argument(
        "-f",
        "--file",
        required=True,
        help="a JSON/YAML file (one definition or a list) or a directory",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="show the workers' backfill progress and wait until it is done",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="for --wait, seconds (600)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "preview",
        help="what applying definitions would do: size, sample, would-enter, would-exit",
        description="Judge every stored profile (read from the state changelog) on the "
        "definitions in FILE as if they were applied, without applying them.",
    )
    p.add_argument("-f", "--file", required=True, help="JSON/YAML file or directory")
    p.add_argument("--sample", type=int, default=10, help="profiles listed per group (10)")
    p.add_argument("--json", action="store_true", help="one JSON object per definition")
    _url_option(p, "ask a worker's API instead of reading Kafka here")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("get", help="list audiences, or print one definition")
    p.add_argument("key", nargs="?", help="audience key")
    _url_option(p, "ask a worker's API (adds audience sizes) instead of reading Kafka here")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser(
        "members",
        help="list the current members of an audience (through a worker's API)",
        description="Pages through every partition's members; prints `id<TAB>entered_at`.",
    )
    p.add_argument("key", help="audience key")
    p.add_argument("--limit", type=int, default=None, help="print at most N members")
    _url_option(p, "a worker's API (required)")
    p.set_defaults(func=cmd_members)

    p = sub.add_parser(
        "history",
        help="an audience's size history as a sparkline (through a worker's API)",
        description="Size at the end of each step (one block character per step), with the "
        "smallest, largest and current size and the users who entered and exited in the range "
        "(GET /v1/audiences/KEY/history).",
    )
    p.add_argument("key", help="audience key")
    p.add_argument(
        "--from",
        dest="start",
        default=None,
        help="start: ISO-8601 or epoch ms (default: an hour before --to)",
    )
    p.add_argument(
        "--to", dest="end", default=None, help="end: ISO-8601 or epoch ms (default: now)"
    )
    p.add_argument("--step", default=None, help="step: 1m (default), 5m, 1h, 1d, ...")
    _url_option(p, "a worker's API (required)")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "explain",
        help="why a user is (not) in an audience: the condition tree (through a worker's API)",
    )
    p.add_argument("user", help="userId (or anonymousId)")
    p.add_argument("key", help="audience key")
    _url_option(p, "a worker's API (required)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("delete", help="delete an audience definition")
    p.add_argument("key", help="audience key")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("users", help="user profiles (through a worker's API)")
    users = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    text = (
        "delete a user (DELETE /v1/users/ID, token scope admin): their memberships exit, "
        "their state and linked anonymous profiles are erased, their later events dropped, "
        "and every destination is told (`User Deleted`: Braze /users/delete, Customer.io "
        "DELETE customer, webhooks and Segment the message, Kafka a delete record); asks "
        "for confirmation unless --yes"
    )
    u = users.add_parser("delete", help="delete a user everywhere", description=text)
    u.add_argument("id", help="userId (or anonymousId)")
    u.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    _url_option(u, "a worker's API (required)")
    u.set_defaults(func=cmd_users_delete)

    p = sub.add_parser("tail", help="print live transitions from the audience-events topic")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest transition")
    p.add_argument("--limit", type=int, default=None, help="stop after N transitions")
    p.add_argument("--json", action="store_true", help="print the raw output events")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("dlq", help="dead letters of the destination sinks")
    dlq = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    text = (
        "re-send the dead letters of one destination (from audience-events-dlq) that arrived "
        "since its last replay; messages that fail again are dead-lettered again"
    )
    r = dlq.add_parser("replay", help=text, description=text)
    r.add_argument(
        "--destination", required=True, help="destination name (from AUDIENCES_DESTINATIONS)"
    )
    r.add_argument(
        "--from-beginning",
        action="store_true",
        help="re-send every dead letter of the destination, not only those since the last replay",
    )
    r.add_argument(
        "--max-retry-age",
        default="1m",
        help="keep retrying a failing message this long before giving up (default 1m)",
    )
    r.set_defaults(func=cmd_dlq_replay)

    p = sub.add_parser("config", help="print the effective settings (secrets redacted)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "bench",
        help="measure this engine against Quix Streams, Faust + Table and a plain loop, in one run",
        description="Catch-up throughput (events/s and events per CPU-second of each worker "
        "process), recovery, memory and latency at half load, on one pre-filled topic and "
        "broker. A full run with the defaults takes about 10 minutes on 2 cores.",
    )
    p.add_argument(
        "--events", type=int, default=1_000_000, help="events to process (default 1000000)"
    )
    p.add_argument(
        "--users",
        type=int,
        default=1_000_000,
        help="users, with Zipf-distributed activity (default 1000000)",
    )
    p.add_argument("--audiences", type=int, default=20, help="audience definitions (default 20)")
    p.add_argument(
        "--partitions", type=int, default=4, help="partitions of the input topic (default 4)"
    )
    p.add_argument(
        "--workload",
        choices=("realistic", "heavy"),
        default="realistic",
        help="realistic: ~1 event in 10 causes a transition; heavy: most do (default realistic)",
    )
    p.add_argument(
        "--broker",
        choices=("embedded", "apache"),
        default="embedded",
        help="broker started for the run when AUDIENCES_KAFKA_BOOTSTRAP is not set: the "
        "embedded one (Tansu) or Apache Kafka (Java >= 17, Maven) (default embedded)",
    )
    p.add_argument(
        "--faust-events",
        type=int,
        default=50_000,
        help="Faust processes only the first N events of the topic (default 50000)",
    )
    p.add_argument("--skip-quix", action="store_true", help="do not run Quix Streams")
    p.add_argument("--skip-faust", action="store_true", help="do not run Faust agent + Table")
    p.add_argument("--skip-plain", action="store_true", help="do not run the plain loop")
    p.add_argument("--skip-latency", action="store_true", help="skip the latency phase")
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)  # now the default
    p.add_argument("--skip-recovery", action="store_true", help="skip the recovery phase")
    p.add_argument(
        "--skip-memory", action="store_true", help="skip the memory phase (1M profiles held)"
    )
    p.add_argument(
        "--memory-profiles",
        type=int,
        default=1_000_000,
        help="profiles the memory phase's worker holds, one event each (default 1000000)",
    )
    p.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="events/s of the latency phase (default: half the engine's measured throughput)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="how long the latency phase measures (10), after its warm-up",
    )
    p.add_argument(
        "--latency-warmup",
        type=float,
        default=5.0,
        help="seconds the latency phase sends at its rate before it measures (5; reported "
        "apart: the fresh topics, stores and caches of the live worker fill meanwhile)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_or_exit(warn_unknown=False)  # invalid: one line, exit code 2
    logs.configure(settings.log_format, settings.log_level)
    warn_unknown_variables()
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:  # e.g. a combination only a command checks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AudiencesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
