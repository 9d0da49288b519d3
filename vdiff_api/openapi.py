"""/openapi.json from the msgspec request schemas, and /docs: Swagger UI served locally.

The Swagger UI files come from the `swagger-ui-bundle` wheel (Swagger UI 4.15, which
renders OpenAPI 3.0), so the docs work offline and load nothing from a CDN. msgspec
writes JSON Schema 2020-12; `_oas30` rewrites the two constructs OpenAPI 3.0 spells
differently (null in a union, numeric exclusive bounds) and drops empty `required` lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from vdiff_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

BODIES: dict[str, type] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
_TAGS = (
    ("/v1/", "OpenAI"),
    ("/tokenize", "Tokenizer"),
    ("/detokenize", "Tokenizer"),
    ("/docs", "Documentation"),
    ("/openapi.json", "Documentation"),
)
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "integer"},
            },
        }
    },
}
_REF = "#/components/schemas/{name}"
_CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # Starlette's "{model:path}" is OpenAPI's "{model}"

DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>vdiff API</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui",
                                 deepLinking: true});
  </script>
</body>
</html>
"""


def _oas30(node: Any) -> Any:
    """JSON Schema 2020-12 (msgspec) to the OpenAPI 3.0 schema dialect."""
    if isinstance(node, list):
        return [_oas30(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _oas30(v) for k, v in node.items()}
    if out.get("required") == []:
        del out["required"]  # 3.0 wants at least one name there
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[plain], out[bound] = out[bound], True
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        del out["anyOf"]
        out["nullable"] = True
        if len(rest) > 1:
            out["anyOf"] = rest
        elif "$ref" in rest[0]:
            out["allOf"] = rest  # a $ref takes no sibling keywords in 3.0
        else:
            out.update(rest[0])
    return out


def spec(
    routes: list[BaseRoute],
    version: str,
    needs_key: Callable[[str], bool],
) -> dict[str, Any]:
    """The OpenAPI document: one operation per route and method, request bodies from the
    msgspec Structs, bearer security on the routes that need a key."""
    names = list(BODIES)
    refs, components = msgspec.json.schema_components([BODIES[n] for n in names], ref_template=_REF)
    body_ref = dict(zip(names, refs))
    schemas = {name: _oas30(s) for name, s in components.items()}
    schemas["Error"] = _ERROR
    paths: dict[str, dict[str, Any]] = {}
    keyed = False
    for route in routes:
        if not isinstance(route, Route):
            continue  # the mounted static assets
        doc = (route.endpoint.__doc__ or route.name).strip().splitlines()
        tag = next((t for prefix, t in _TAGS if route.path.startswith(prefix)), "Operations")
        path = _CONVERTOR.sub(r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op: dict[str, Any] = {
                "operationId": f"{route.name}_{method.lower()}",
                "summary": doc[0],
                "tags": [tag],
                "responses": {
                    "200": {"description": "OK"},
                    "default": {
                        "description": "An OpenAI-shaped error",
                        "content": {
                            "application/json": {"schema": {"$ref": _REF.format(name="Error")}}
                        },
                    },
                },
            }
            if len(doc) > 1:
                op["description"] = " ".join(line.strip() for line in doc[1:]).strip()
            if route.param_convertors:
                op["parameters"] = [
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                    for name in route.param_convertors
                ]
            if route.path in body_ref:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body_ref[route.path]}},
                }
            if needs_key(route.path):
                op["security"] = [{"bearer": []}]
                keyed = True
            paths.setdefault(path, {})[method.lower()] = op
    out: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "vdiff",
            "version": version,
            "description": "OpenAI-compatible API for diffusion language models",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if keyed:
        out["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return out
