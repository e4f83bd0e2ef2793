"""Bearer tokens of the management API (SPEC §8).

Every route except `/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer
TOKEN` with a token of AUDIENCES_API_TOKENS whose scope suffices: reads `read`,
definition changes `write`, user deletion `admin` (`required_scope`; scopes are ordered
read < write < admin). 401 + `WWW-Authenticate: Bearer` without a valid token, 403 for a
weaker scope, both JSON `{"error": message}`. The same rule documents the routes in the
OpenAPI document (`openapi.py`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from audiences.adapters.settings import SCOPES, ApiToken

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # no token needed (SPEC §8)
# and the console (`/ui`, `/ui/...`): static files only, its data comes from the API
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POSTS = frozenset({"/v1/audiences/preview"})  # POSTs that only read (a preview)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs (None: an open route). User deletion needs `admin`,
    other changes (PUT/DELETE of definitions) `write`, reads (previews and internal
    partition queries included) `read`."""
    if path.rstrip("/") in OPEN_PATHS or path == "/ui" or path.startswith("/ui/"):
        return None  # the console's shell and assets hold no data: its API calls need tokens
    if method == "DELETE" and path.startswith("/v1/users/"):
        return "admin"
    if method in READ_METHODS or path in READ_POSTS:
        return "read"
    if method == "POST" and path.startswith("/v1/internal/partitions/"):
        return "read"  # the internal preview
    return "write"


class TokenCheck:
    """Constant-time token lookup: the presented token's SHA-256 is compared with every
    configured token's (equal lengths, `hmac.compare_digest`, no early exit), so neither
    a token's content, its length nor which entry matched shows in the timing."""

    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._digests = [(hashlib.sha256(t.token.encode()).digest(), t.rank) for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def rank(self, presented: str) -> int:
        """The highest scope rank of the presented token, -1 if it is no token."""
        digest = hashlib.sha256(presented.encode()).digest()
        best = -1
        for known, rank in self._digests:
            equal = hmac.compare_digest(digest, known)
            best = max(best, rank if equal else -1)
        return best


def bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def auth_middleware(tokens: tuple[ApiToken, ...]) -> Middleware:
    """aiohttp middleware enforcing the tokens on every route but the open ones (a no-op
    without tokens: the API then listens on loopback only)."""
    check = TokenCheck(tokens)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = required_scope(request.method, request.path)
        if needed is None or not check.enabled:
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        rank = check.rank(token) if token is not None else -1
        if rank < 0:
            message = (
                "missing bearer token: send Authorization: Bearer TOKEN"
                if token is None
                else "invalid token"
            )
            return _error(message, 401, {"WWW-Authenticate": 'Bearer realm="audiences"'})
        if rank < SCOPES.index(needed):
            return _error(
                f"this token's scope is {SCOPES[rank]!r}; "
                f"{request.method} {request.path} needs {needed!r}",
                403,
            )
        return await handler(request)

    return authenticate
