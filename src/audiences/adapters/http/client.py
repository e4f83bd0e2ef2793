"""A small synchronous client of the management API, for the CLI (stdlib only)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from audiences.errors import AdapterError, ApiError


class ApiClient:
    """Requests to one worker's API, with `Authorization: Bearer token` when a token is
    given (SPEC §8). A refused token raises ApiError 401/403 with a message saying what
    to do."""

    def __init__(self, base_url: str, timeout: float = 60.0, token: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        url = self.base_url + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                answer = {"error": raw.decode("utf-8", "replace")[:200] or exc.reason}
            body = answer if isinstance(answer, dict) else {}
            message = str(body.pop("error", None) or f"HTTP {exc.code}")
            if exc.code == 401:
                given = "the token was refused" if self.token else "no token was given"
                message = (
                    f"the API at {self.base_url} needs a valid token ({given}: {message}); "
                    "pass --token TOKEN or set AUDIENCES_API_TOKEN"
                )
            elif exc.code == 403:
                message = (
                    f"the API at {self.base_url} refused this token's scope ({message}); "
                    "use a token with a stronger scope"
                )
            raise ApiError(exc.code, message, **body) from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdapterError(
                f"cannot reach the API at {self.base_url}: {exc}", retriable=True
            ) from exc


def quote(segment: str) -> str:
    """A path segment (user ids may hold '/', '?', spaces)."""
    return urllib.parse.quote(segment, safe="")
