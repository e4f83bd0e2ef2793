"""The exception tree of `audiences`.

AudiencesError
├── InvalidEventError        an input event cannot be used (reason goes to the DLQ header)
├── DefinitionError          a definition is invalid: carries the JSON path and a suggestion
├── RejectedRequest          the collector refuses an HTTP request: carries the status and a message
├── DestinationConfigError   the destinations file is invalid: names the destination and the key
├── ApiError                 an error answer of the management API: HTTP status and JSON body
└── AdapterError             an I/O adapter failed; `retriable` says whether trying again may help
    └── BrokerError          the Kafka broker (embedded or external) is unusable
        └── DeliveryError    records were not acknowledged in time (or no room to queue them)
"""

from __future__ import annotations

from typing import Any


def _suggesting(text: str, suggestion: str | None) -> str:
    return f"{text} (did you mean {suggestion!r}?)" if suggestion else text


class AudiencesError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidEventError(AudiencesError):
    """An event that cannot be evaluated. `reason` is a short, bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DefinitionError(AudiencesError):
    """An invalid audience or computed-trait definition. `reason` is a short, bounded
    label for metrics: `invalid` (the shape), `limits` (deeper, larger or with longer
    patterns than SPEC §11 allows), `pattern` (a regex RE2 cannot run), `uncompilable`."""

    def __init__(
        self, path: str, message: str, suggestion: str | None = None, reason: str = "invalid"
    ) -> None:
        super().__init__(_suggesting(f"{path}: {message}", suggestion))
        self.path = path
        self.message = message
        self.suggestion = suggestion
        self.reason = reason


class RejectedRequest(AudiencesError):
    """An HTTP request the collector refuses. `status` is the HTTP status, `code` a short
    machine-readable label (Segment's error body carries both `code` and `message`)."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # sent as Retry-After (a 429)


class DestinationConfigError(AudiencesError):
    """An invalid destinations file (SPEC §6): names the destination and the key at fault."""

    def __init__(
        self, destination: str, key: str, message: str, suggestion: str | None = None
    ) -> None:
        where = f"destination {destination!r}" if destination else "destinations file"
        where += f", key {key!r}" if key else ""
        super().__init__(_suggesting(f"{where}: {message}", suggestion))
        self.destination = destination
        self.key = key
        self.message = message
        self.suggestion = suggestion


class ApiError(AudiencesError):
    """An error answer of the management API (raised by its handlers, and by the CLI's
    client when a worker answers one): `status` and the JSON `body`, which is
    `{"error": message}` plus details (`path`, `suggestion` for an invalid definition)."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, **details}


class AdapterError(AudiencesError):
    """An I/O failure; `retriable` tells the caller whether a retry can succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class BrokerError(AdapterError):
    """The Kafka broker cannot be reached or refused an operation."""


class DeliveryError(BrokerError):
    """Records were not acknowledged by Kafka: no room in the in-flight budget or the
    producer queue, an acknowledgement later than the deadline, or a delivery failure.
    Always retriable; `retry_after_s` is a hint for the client."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, retriable=True)
        self.retry_after_s = retry_after_s
