"""The OpenAPI document is valid and lists exactly the routes a worker's web server has."""

from __future__ import annotations

from pathlib import Path

from apiserver import ApiServer, free_port
from openapi_spec_validator import validate

from audiences.adapters.http.auth import required_scope
from audiences.adapters.http.openapi import OPENAPI
from audiences.adapters.settings import Settings
from audiences.bootstrap import worker_app

# Faust's own blueprints (table/router introspection, index page): not part of our API; nor
# is the console (`/ui`: static HTML, CSS and JavaScript over this API).
FAUST_BUILTIN = ("/router", "/table", "/ui")
METHODS = ("get", "put", "post", "delete", "patch")


def worker_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(METHOD, path) of the web server of a worker app (built, not started)."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1", data_dir=str(tmp_path))
    web = worker_app(settings).web
    web.init_server()  # what the worker does before it listens: calls on_webserver_init
    routes = set()
    for route in web.web_app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path == "/" or path.startswith(FAUST_BUILTIN):
            continue
        routes.add((route.method, path))
    return routes


def documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in OPENAPI["paths"].items()
        for method in METHODS
        if method in item
    }


def test_the_document_is_valid_openapi() -> None:
    validate(OPENAPI)
    assert OPENAPI["openapi"].startswith("3.1")


def test_the_document_and_the_worker_routes_match(tmp_path: Path) -> None:
    routes = worker_routes(tmp_path)
    assert ("PUT", "/v1/audiences/{key}") in routes  # the API really is on the worker
    assert ("GET", "/readyz") in routes
    assert documented() - routes == set(), "documented but not served"
    assert routes - documented() == set(), "served but not documented"


def test_every_path_parameter_is_declared() -> None:
    for path, item in OPENAPI["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *item[method].get("parameters", [])]
                if p["in"] == "path"
            }
            expected = {part[1:-1] for part in path.split("/") if part.startswith("{")}
            assert declared == expected, (method, path)


def test_the_server_serves_the_document(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", data_dir=str(tmp_path), web_port=free_port())
    server = ApiServer(settings).start()
    try:
        answer = server("GET", "/openapi.json")
        assert answer.status == 200 and answer.json() == OPENAPI
    finally:
        server.stop()


def test_every_operation_declares_the_scope_the_server_enforces() -> None:
    assert OPENAPI["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": OPENAPI["components"]["securitySchemes"]["bearer"]["description"],
        }
    }
    scopes = {}
    for path, item in OPENAPI["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                expected = required_scope(method.upper(), path)
                if expected is None:
                    assert operation["security"] == [], path
                    assert "401" not in operation["responses"], path
                else:
                    assert operation["security"] == [{"bearer": [expected]}], (method, path)
                    assert {"401", "403"} <= set(operation["responses"]), (method, path)
                scopes[(method.upper(), path)] = expected
    assert {p for (_, p), s in scopes.items() if s is None} == {"/healthz", "/readyz", "/metrics"}
    assert scopes[("DELETE", "/v1/users/{id}")] == "admin"
    assert scopes[("PUT", "/v1/audiences/{key}")] == scopes[("DELETE", "/v1/traits/{key}")]
    assert scopes[("PUT", "/v1/audiences/{key}")] == "write"
    assert scopes[("POST", "/v1/audiences/preview")] == "read"
