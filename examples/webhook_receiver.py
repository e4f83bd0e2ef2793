"""A webhook receiver for trying destinations locally: verifies Standard Webhooks
signatures (secret from DEMO_WEBHOOK_SECRET) and prints each transition.

    .venv/bin/python examples/webhook_receiver.py [PORT]     # default 9000
"""

from __future__ import annotations

import hmac
import os
import sys
import time

import orjson
from aiohttp import web

from audiences.adapters.sinks.render import sign_webhook

SECRET = os.environ.get("DEMO_WEBHOOK_SECRET", "")


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    if SECRET:
        msg_id = request.headers.get("webhook-id", "")
        stamp = request.headers.get("webhook-timestamp", "0")
        expected = sign_webhook(SECRET, msg_id, int(stamp), body)
        signatures = request.headers.get("webhook-signature", "").split()
        if abs(time.time() - int(stamp)) > 300 or not any(
            hmac.compare_digest(expected, s) for s in signatures
        ):
            print("rejected: bad signature", flush=True)
            return web.json_response({"error": "bad signature"}, status=401)
    data = orjson.loads(body)
    for message in data if isinstance(data, list) else [data]:
        props = message.get("properties", {})
        user = message.get("userId") or message.get("anonymousId")
        print(
            f"{message.get('timestamp')}  {message.get('event'):<16} "
            f"{props.get('audience_key')}  {user}",
            flush=True,
        )
    return web.json_response({})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 9000)
