"""`audiences demo --destinations FILE` (what `AUDIENCES_DESTINATIONS=FILE make demo` runs):
the worker's sinks deliver the demo's transitions to a webhook, signed."""

from __future__ import annotations

import hmac
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from audiences.adapters.sinks.render import sign_webhook

pytestmark = pytest.mark.system
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.messages: list[dict[str, Any]] = []
        self.bad_signatures = 0


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = sign_webhook(
            SECRET, self.headers["webhook-id"], int(self.headers["webhook-timestamp"]), body
        )
        if not hmac.compare_digest(expected, self.headers["webhook-signature"]):
            self.server.bad_signatures += 1
        self.server.messages.append(orjson.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_demo_delivers_its_transitions_to_a_webhook(tmp_path: Path) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    file = tmp_path / "destinations.yaml"
    url = f"http://127.0.0.1:{receiver.server_address[1]}/audiences"
    file.write_text(
        f"- name: demo-webhook\n  type: webhook\n  url: {url}\n  secret: ${{HOOK_SECRET}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    env["HOOK_SECRET"] = SECRET
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "audiences", "demo", "--users", "40"),
                *("--hour-ms", "1000", "--duration", "35", "--destinations", str(file)),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )
    finally:
        receiver.shutdown()
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"destination demo-webhook (webhook) -> {url}" in out
    shown = set(re.findall(r"(Audience \w+)\s+(\w+)\s+(\S+)$", out, re.MULTILINE))
    received = [
        # (account audiences carry the account's groupId instead of a userId)
        (m["event"], m["properties"]["audience_key"], m.get("userId") or m["groupId"])
        for m in receiver.messages
        if m["event"] != "Trait Computed"  # the demo's lifetime_value trait is sent too
    ]
    traits = [m for m in receiver.messages if m["event"] == "Trait Computed"]
    assert {m["properties"]["trait_key"] for m in traits} <= {"lifetime_value"}
    assert receiver.bad_signatures == 0
    assert received, out[-2000:]
    assert set(received) <= shown  # what the webhook got is what the topic holds
    assert len(set(received)) >= len(shown) // 2  # and it kept up with the demo
    assert len({m["messageId"] for m in receiver.messages}) == len(receiver.messages)
