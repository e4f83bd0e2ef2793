"""The OpenAPI 3.1 document of a worker's web server, served at `/openapi.json`.

A test validates it and checks it lists exactly the routes the server has.
"""

from __future__ import annotations

from typing import Any

from audiences import __version__
from audiences.adapters.http.auth import required_scope


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"$ref": "#/components/responses/Error", "description": description}


def _path_param(
    name: str, description: str, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


KEY = _path_param("key", "audience or computed-trait key")
USER = _path_param("id", "userId (or anonymousId of an anonymous profile)")
UNAVAILABLE = _error("Kafka or the worker owning the data is unavailable; retry (Retry-After)")
DEFINITION_BODY = {
    "required": True,
    "content": {"application/json": {"schema": _ref("Definition")}},
}


def _definition_paths(kind: str) -> dict[str, Any]:
    what = "audience" if kind == "audiences" else "computed trait"
    summary_schema = _ref("AudienceSummary" if kind == "audiences" else "TraitSummary")
    return {
        f"/v1/{kind}": {
            "get": {
                "operationId": f"list_{kind}",
                "summary": f"List {what}s" + (" with their sizes" if kind == "audiences" else ""),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {kind: {"type": "array", "items": summary_schema}},
                            "required": [kind],
                        },
                        f"every {what}",
                    ),
                    "503": UNAVAILABLE,
                },
            }
        },
        f"/v1/{kind}/{{key}}": {
            "parameters": [KEY],
            "get": {
                "operationId": f"get_{kind}",
                "summary": f"One {what}: the stored document with `version`"
                + (" and `size`" if kind == "audiences" else ""),
                "responses": {
                    "200": _json(_ref("StoredDefinition"), f"the {what}"),
                    "404": _error(f"no such {what}"),
                    "503": UNAVAILABLE,
                },
            },
            "put": {
                "operationId": f"put_{kind}",
                "summary": f"Create or replace a {what} (validated; a changed document gets the "
                "next version, an unchanged one is a no-op)",
                "requestBody": DEFINITION_BODY,
                "responses": {
                    "200": _json(_ref("Applied"), "updated, or unchanged (`changed: false`)"),
                    "201": _json(_ref("Applied"), "created as version 1"),
                    "400": _error("the body is not JSON"),
                    "409": _error("the key belongs to the other kind of definition"),
                    "422": {
                        "description": "invalid definition",
                        "content": {"application/json": {"schema": _ref("ValidationError")}},
                    },
                    "503": UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": f"delete_{kind}",
                "summary": f"Delete a {what}"
                + (
                    " (its members exit with reason.trigger `deleted`)"
                    if kind == "audiences"
                    else ""
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string"},
                                "deleted": {"type": "boolean"},
                                "version": {"type": "integer"},
                            },
                        },
                        "deleted",
                    ),
                    "404": _error(f"no such {what}"),
                    "503": UNAVAILABLE,
                },
            },
        },
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "audiences management API",
        "version": __version__,
        "description": "Served by every worker. Requests about a user are answered by the "
        "worker owning the user's partition (forwarded there when needed). Errors are "
        '`{"error": message}`; 503 means retry.',
    },
    "tags": [
        {"name": "definitions"},
        {"name": "users"},
        {"name": "operations"},
        {"name": "internal", "description": "worker-to-worker calls (fan-out of pages and sizes)"},
    ],
    "paths": {
        **_definition_paths("audiences"),
        **_definition_paths("traits"),
        "/v1/audiences/preview": {
            "post": {
                "operationId": "preview_audience",
                "summary": "What applying a definition would do, judged on every stored "
                "profile; nothing is written",
                "parameters": [
                    _query_param(
                        "sample",
                        "profiles listed per group (default 10)",
                        {"type": "integer", "minimum": 0, "maximum": 1000},
                    )
                ],
                "requestBody": DEFINITION_BODY,
                "responses": {
                    "200": _json(_ref("Preview"), "the preview report"),
                    "400": _error("the body is not JSON"),
                    "422": {
                        "description": "invalid definition",
                        "content": {"application/json": {"schema": _ref("ValidationError")}},
                    },
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/audiences/{key}/members": {
            "get": {
                "operationId": "list_members",
                "summary": "Current members, paged across all partitions (key order within "
                "each). A page may be shorter than `limit`; continue while `next_cursor` is "
                "not null.",
                "parameters": [
                    _path_param("key", "audience key"),
                    _query_param(
                        "limit",
                        "members per page (default 100)",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                    ),
                    _query_param(
                        "cursor", "`next_cursor` of the previous page", {"type": "string"}
                    ),
                ],
                "responses": {
                    "200": _json(_ref("MembersPage"), "one page"),
                    "400": _error("bad limit or cursor"),
                    "404": _error("no such audience"),
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/audiences/{key}/history": {
            "get": {
                "operationId": "audience_history",
                "summary": "Size history over every partition: per step, its start `t`, the "
                "size at its end and the transitions that entered and exited in it (by their "
                "event time). Kept per minute for 30 days; minutes before the audience existed "
                "(or older than 30 days) are empty.",
                "parameters": [
                    _path_param("key", "audience key"),
                    _query_param(
                        "from",
                        "start (ISO-8601 or epoch milliseconds; default one hour before `to`); "
                        "rounded down to a multiple of `step`",
                        {"type": "string"},
                    ),
                    _query_param(
                        "to",
                        "end (ISO-8601 or epoch milliseconds; default now)",
                        {"type": "string"},
                    ),
                    _query_param(
                        "step",
                        "step length, at least 1m, whole minutes: 1m (default), 5m, 1h, 1d "
                        "(at most 10000 steps)",
                        {"type": "string", "pattern": "^[0-9]+(s|m|min|h|d)$"},
                    ),
                ],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": _ref("HistoryPoint")}, "one point per step"
                    ),
                    "400": _error(
                        "unreadable from/to/step, from after to, step under 1m, or too many steps"
                    ),
                    "404": _error("no such audience"),
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/users/{id}": {
            "parameters": [USER],
            "get": {
                "operationId": "get_user",
                "summary": "A profile: traits, computed traits, audiences with entered_at, "
                "devices, identity links",
                "responses": {
                    "200": _json(_ref("User"), "the profile"),
                    "404": _error("no profile (never seen, or deleted)"),
                    "409": _error("the profile is quarantined (it made the engine fail)"),
                    "503": UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "delete_user",
                "summary": "Suppress and delete a user: a delete control record is written "
                "to `events`; the owning worker exits its audiences (reason.trigger `deleted`), "
                "erases the user and its linked anonymous profiles, drops their later events "
                "and emits `User Deleted`, which every destination is sent (unless it sets "
                "`forward_deletions: false`). Accepted for any id, known or not",
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "properties": {
                                "userId": {"type": "string"},
                                "accepted": {"type": "boolean"},
                            },
                        },
                        "the deletion is on its way",
                    ),
                    "503": UNAVAILABLE,
                },
            },
        },
        "/v1/users/{id}/explain/{key}": {
            "get": {
                "operationId": "explain_user",
                "summary": "Why a profile is (not) in an audience: the condition tree with each "
                "node's value and the events, traits or memberships that decided it",
                "parameters": [USER, _path_param("key", "audience key")],
                "responses": {
                    "200": _json(_ref("Explanation"), "the explanation"),
                    "404": _error("no such user or audience"),
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/internal/sizes": {
            "get": {
                "operationId": "internal_sizes",
                "tags": ["internal"],
                "summary": "Members per audience of each partition this worker owns",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "partitions": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "object",
                                        "additionalProperties": {"type": "integer"},
                                    },
                                }
                            },
                        },
                        "sizes by partition",
                    )
                },
            }
        },
        "/v1/internal/history/{key}": {
            "get": {
                "operationId": "internal_history",
                "tags": ["internal"],
                "summary": "An audience's member count and minute buckets ([minute_ms, entered, "
                "exited], from `from` on) of each partition this worker owns",
                "parameters": [
                    _path_param("key", "audience key"),
                    _query_param("from", "first minute (epoch milliseconds)", {"type": "integer"}),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "partitions": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "object",
                                        "properties": {
                                            "size": {"type": "integer"},
                                            "buckets": {
                                                "type": "array",
                                                "items": {
                                                    "type": "array",
                                                    "items": {"type": "integer"},
                                                },
                                            },
                                        },
                                    },
                                }
                            },
                        },
                        "buckets by partition",
                    ),
                    "400": _error("bad from"),
                },
            }
        },
        "/v1/internal/partitions/{partition}/members/{key}": {
            "get": {
                "operationId": "internal_partition_members",
                "tags": ["internal"],
                "summary": "One partition's members from a key on (never forwarded)",
                "parameters": [
                    _path_param("partition", "partition number", {"type": "integer"}),
                    _path_param("key", "audience key"),
                    _query_param("from", "hex profile key to start at", {"type": "string"}),
                    _query_param("limit", "members at most", {"type": "integer", "minimum": 1}),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "partition": {"type": "integer"},
                                "members": {"type": "array", "items": _ref("Member")},
                                "next": {"type": ["string", "null"]},
                            },
                        },
                        "members and where to continue (null: partition done)",
                    ),
                    "503": _error("this worker does not own the partition"),
                },
            }
        },
        "/v1/internal/partitions/{partition}/preview": {
            "post": {
                "operationId": "internal_partition_preview",
                "tags": ["internal"],
                "summary": "One chunk of a preview on one partition, from a key on (never "
                "forwarded)",
                "parameters": [
                    _path_param("partition", "partition number", {"type": "integer"}),
                    _query_param("from", "hex profile key to start at", {"type": "string"}),
                    _query_param(
                        "sample", "profiles listed per group", {"type": "integer", "minimum": 0}
                    ),
                ],
                "requestBody": DEFINITION_BODY,
                "responses": {
                    "200": _json(
                        {
                            "allOf": [
                                _ref("Preview"),
                                {
                                    "type": "object",
                                    "properties": {"next": {"type": ["string", "null"]}},
                                },
                            ]
                        },
                        "the chunk's preview and where to continue (null: partition done)",
                    ),
                    "503": _error("this worker does not own the partition"),
                },
            }
        },
        "/v1/transitions/stream": {
            "get": {
                "operationId": "transitions_stream",
                "summary": "Live transitions as server-sent events (the console's live feed): a "
                "`ready` event once positioned at the end of audience-events, then one "
                "`transition` event per output record from then on (data: the record as "
                "`audiences tail --json` prints it), `: heartbeat` comments, and a `failure` "
                "event if Kafka fails (reconnect). Read with fetch (EventSource sends no token).",
                "parameters": [
                    _query_param(
                        "audience",
                        "only the transitions of this audience or computed trait",
                        {"type": "string"},
                    )
                ],
                "responses": {
                    "200": {
                        "description": "the stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/destinations": {
            "get": {
                "operationId": "list_destinations",
                "summary": "The destinations this worker delivers to and what its sinks "
                "counted since it started (the sink metrics): delivered, dead-lettered, "
                "skipped, retried requests, queued, paused. Per worker: each counts what it "
                "delivered itself.",
                "parameters": [
                    _query_param(
                        "audience",
                        "only the destinations that receive this audience",
                        {"type": "string"},
                    )
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "since": {"type": "string"},
                                "destinations": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "name": {"type": "string"},
                                            "type": {"type": ["string", "null"]},
                                            "audiences": {
                                                "type": ["array", "null"],
                                                "items": {"type": "string"},
                                            },
                                            "delivered": {"type": "integer"},
                                            "dead_lettered": {"type": "integer"},
                                            "skipped": {"type": "integer"},
                                            "retries": {"type": "integer"},
                                            "queue_depth": {"type": "integer"},
                                            "paused": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                        },
                        "destinations and their delivery counts",
                    ),
                    "503": _error("the destinations file cannot be read"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["operations"],
                "summary": "The process is up",
                "responses": {"200": _json({"type": "object"}, "up")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "tags": ["operations"],
                "summary": "Partitions assigned and their state recovered",
                "responses": {
                    "200": _json({"type": "object"}, "ready"),
                    "503": _json({"type": "object"}, "not ready yet"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    },
    "components": {
        "responses": {
            "Error": {
                "description": "an error",
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            },
            "ValidationError": {
                "type": "object",
                "properties": {
                    "error": {"type": "string"},
                    "path": {"type": "string", "description": "JSON path, e.g. $.condition.all[0]"},
                    "suggestion": {"type": ["string", "null"]},
                },
                "required": ["error", "path"],
            },
            "Definition": {
                "type": "object",
                "description": "An audience (`condition`), a computed trait (`kind`) or a "
                "priority list (`kind: priority_list` with `audiences`); see the README for "
                "the language. `key` defaults to the URL's.",
                "properties": {
                    "key": {"type": "string"},
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "condition": {"type": "object"},
                    "kind": {"type": "string"},
                    "audiences": {"type": "array", "items": {"type": "string"}},
                    "include_anonymous": {"type": "boolean"},
                    "backfill": {"type": "boolean"},
                },
                "additionalProperties": True,
            },
            "StoredDefinition": {
                "allOf": [
                    _ref("Definition"),
                    {
                        "type": "object",
                        "properties": {
                            "version": {"type": "integer"},
                            "created_at": {"type": "string", "format": "date-time"},
                            "size": {
                                "type": ["integer", "null"],
                                "description": "audiences: current members (null while a "
                                "partition's owner cannot be asked)",
                            },
                        },
                        "required": ["version"],
                    },
                ]
            },
            "AudienceSummary": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "name": {"type": "string"},
                    "version": {"type": "integer"},
                    "created_at": {"type": ["string", "null"]},
                    "size": {
                        "type": ["integer", "null"],
                        "description": "a priority list: the members of its audiences "
                        "(disjoint: the sum of their sizes)",
                    },
                    "kind": {"type": "string", "description": "priority_list for a list"},
                    "audiences": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["key", "version"],
            },
            "TraitSummary": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "version": {"type": "integer"},
                    "created_at": {"type": ["string", "null"]},
                },
                "required": ["key", "version", "kind"],
            },
            "Applied": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "version": {"type": "integer"},
                    "changed": {"type": "boolean"},
                },
                "required": ["key", "version", "changed"],
            },
            "Preview": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "version": {"type": "integer", "description": "version it would get"},
                    "current_version": {"type": ["integer", "null"]},
                    "profiles": {"type": "integer", "description": "profiles judged"},
                    "size": {"type": "integer"},
                    "entering": {"type": "integer"},
                    "exiting": {"type": "integer"},
                    "sample": {"type": "array"},
                    "would_enter": {"type": "array", "items": {"type": "string"}},
                    "would_exit": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["key", "size", "sample", "would_enter", "would_exit"],
            },
            "Member": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "anonymous": {"type": "boolean"},
                    "entered_at": {"type": "string", "format": "date-time"},
                },
                "required": ["id", "entered_at"],
            },
            "HistoryPoint": {
                "type": "object",
                "properties": {
                    "t": {"type": "string", "format": "date-time"},
                    "size": {"type": "integer"},
                    "entered": {"type": "integer"},
                    "exited": {"type": "integer"},
                },
                "required": ["t", "size", "entered", "exited"],
            },
            "MembersPage": {
                "type": "object",
                "properties": {
                    "audience": {"type": "string"},
                    "members": {"type": "array", "items": _ref("Member")},
                    "next_cursor": {"type": ["string", "null"]},
                },
                "required": ["members", "next_cursor"],
            },
            "User": {
                "type": "object",
                "properties": {
                    "userId": {"type": "string"},
                    "partition": {"type": "integer"},
                    "anonymous": {"type": "boolean"},
                    "merged_into": {
                        "type": ["string", "null"],
                        "description": "an anonymous profile merged into this user",
                    },
                    "anonymous_ids": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "merged": {"type": "boolean"},
                            },
                        },
                    },
                    "traits": {"type": "object"},
                    "computed_traits": {"type": "object"},
                    "audiences": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string"},
                                "name": {"type": "string"},
                                "entered_at": {"type": "string", "format": "date-time"},
                                "next_check": {"type": ["string", "null"]},
                            },
                        },
                    },
                    "devices": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "type": {"type": "string"},
                                "push_enabled": {"type": "boolean"},
                                "last_seen": {"type": "string"},
                            },
                        },
                    },
                    "accounts": {
                        "type": "array",
                        "description": "accounts the user is linked to by `group` calls (kept "
                        "while an account audience exists); each account's profile is "
                        "`group:{groupId}`",
                        "items": {
                            "type": "object",
                            "properties": {
                                "groupId": {"type": "string"},
                                "profile": {"type": "string"},
                            },
                        },
                    },
                    "updated_at": {"type": ["string", "null"]},
                },
                "required": ["userId", "traits", "computed_traits", "audiences"],
            },
            "Explanation": {
                "type": "object",
                "properties": {
                    "userId": {"type": "string"},
                    "audience": {"type": "string"},
                    "version": {"type": "integer"},
                    "at": {"type": "string"},
                    "member": {"type": "boolean"},
                    "member_since": {"type": ["string", "null"]},
                    "next_check": {"type": ["string", "null"]},
                    "value": {"type": "boolean"},
                    "anonymous_excluded": {"type": "boolean"},
                    "holdout": {
                        "type": "object",
                        "description": "only for an audience with a holdout: the profile's "
                        "bucket under the holdout salt and whether it is in the holdout",
                        "properties": {
                            "percent": {"type": "number"},
                            "salt": {"type": "string"},
                            "bucket": {"type": "integer"},
                            "in_holdout": {"type": "boolean"},
                        },
                    },
                    "condition": {
                        "type": "object",
                        "description": "the tree: each node's kind, value, next change, "
                        "evidence and children",
                    },
                },
                "required": ["audience", "member", "value", "condition"],
            },
        },
    },
}

OPENAPI["components"]["securitySchemes"] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A token of AUDIENCES_API_TOKENS (`token:scope`). Each operation lists "
        "the scope it needs: read < write < admin (a stronger scope allows what a weaker "
        "one does). 401 without a valid token, 403 for a weaker scope. A worker without "
        "tokens serves the API unauthenticated, on loopback only.",
    }
}
OPENAPI["components"]["responses"]["Unauthorized"] = {
    "description": "no valid bearer token (`WWW-Authenticate: Bearer`)",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "content": {"application/json": {"schema": _ref("Error")}},
}
OPENAPI["components"]["responses"]["Forbidden"] = {
    "description": "the token's scope is weaker than the operation needs",
    "content": {"application/json": {"schema": _ref("Error")}},
}


def _secure(document: dict[str, Any]) -> None:
    """`security` on every operation (the scope `auth.required_scope` enforces as the
    OpenAPI 3.1 role list; an empty list for the open routes), with 401/403 answers."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue  # path-level `parameters`
            scope = required_scope(method.upper(), path)
            if scope is None:
                operation["security"] = []
                continue
            operation["security"] = [{"bearer": [scope]}]
            operation["responses"].setdefault(
                "401", {"$ref": "#/components/responses/Unauthorized"}
            )
            operation["responses"].setdefault("403", {"$ref": "#/components/responses/Forbidden"})
            operation["description"] = (
                operation.get("description", "") + f" Needs a token with scope `{scope}`."
            ).strip()


_secure(OPENAPI)
