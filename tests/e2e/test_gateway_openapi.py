"""/openapi.json (valid OpenAPI 3.0 from the msgspec schemas, every route) and /docs
(Swagger UI whose files the gateway serves itself)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate

from tests.conftest import Server, free_port, spawn, wait_ready

ROUTES = {
    "/v1/completions": {"post"},
    "/v1/chat/completions": {"post"},
    "/v1/models": {"get"},
    "/v1/models/{model}": {"get"},
    "/v1/engine/stats": {"get"},
    "/tokenize": {"post"},
    "/detokenize": {"post"},
    "/health": {"get"},
    "/health/live": {"get"},
    "/health/ready": {"get"},
    "/metrics": {"get"},
    "/version": {"get"},
    "/openapi.json": {"get"},
    "/docs": {"get"},
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway alone, without keys: the documents need no worker."""
    port = free_port()
    proc = spawn(
        "vdiff_api.cli",
        ["--port", str(port), "--zmq-bind", f"tcp://127.0.0.1:{free_port()}"],
        tmp_path_factory.mktemp("openapi") / "gateway.log",
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, [proc], path="/health/live")
    yield base
    assert proc.stop() == 0


def test_openapi_is_valid_and_covers_every_route(plain: str) -> None:
    doc = httpx.get(plain + "/openapi.json").json()
    validate(doc)
    assert {p: set(ops) for p, ops in doc["paths"].items()} == ROUTES
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert completion["required"] == ["prompt"] and not completion["additionalProperties"]
    assert completion["properties"]["block_length"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1 << 20,
        "nullable": True,
        "default": None,
    }
    assert "diffusion_steps" in schemas["ChatCompletionRequest"]["properties"]
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert "securitySchemes" not in doc["components"]  # no keys, no security
    retrieve = doc["paths"]["/v1/models/{model}"]["get"]
    assert retrieve["parameters"] == [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


def test_openapi_names_bearer_security_where_a_key_is_needed(secured: Server) -> None:
    doc = httpx.get(secured.base + "/openapi.json").json()
    validate(doc)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    secured_paths = {
        p for p, ops in doc["paths"].items() if any("security" in op for op in ops.values())
    }
    assert secured_paths == {p for p in ROUTES if p.startswith("/v1/")} | {
        "/tokenize",
        "/detokenize",
    }


def test_docs_page_and_its_assets_are_served_locally(plain: str) -> None:
    page = httpx.get(plain + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text  # nothing from another host
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"):
        assert f"docs/assets/{asset}" in page.text
        r = httpx.get(f"{plain}/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert "SwaggerUIBundle" in httpx.get(plain + "/docs/assets/swagger-ui-bundle.js").text
    assert httpx.get(plain + "/docs/assets/../openapi.py").status_code == 404
