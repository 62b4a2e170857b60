"""The OpenAPI 3.1 document, generated from the route table: paths, key schemes, and the JSON Schemas of the
routes' request and response Structs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from cheapest.api.common import ErrorResponse

if TYPE_CHECKING:
    from cheapest.server.routes import Route


_REF = "#/components/schemas/{name}"


def build_openapi(ops: Sequence[Route]) -> dict[str, Any]:
    types = sorted({t for op in ops for t in (op.request, op.response) if t is not None} | {ErrorResponse},
                   key=lambda t: t.__name__)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = {t: s for t, s in zip(types, schemas)}
    error = {"description": "Error (OpenAI error shape)",
             "content": {"application/json": {"schema": refs[ErrorResponse]}}}
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        method = op.method.lower()
        entry: dict[str, Any] = {"summary": op.summary, "operationId": f"{method}_{op.path}"}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in (seg[1:-1] for seg in op.path.split("/") if seg.startswith("{"))
        ]
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[op.request]}}}
        content: dict[str, Any] = {"application/json": {"schema": refs[op.response]}} if op.response else {}
        if op.streams:
            content["text/event-stream"] = {"schema": {"type": "string", "description": "SSE chunks, then [DONE]"}}
        entry["responses"] = {"200": {"description": "OK", "content": content}, "default": error}
        if op.auth:
            entry["security"] = [{"inferenceKey" if op.auth == "sk" else "managementKey": []}]
        paths.setdefault(op.path, {})[method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "cheapest", "version": "0.1.0",
                 "description": "Privacy-first, OpenAI-compatible inference for open-source models."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "inferenceKey": {"type": "http", "scheme": "bearer", "description": "sk_ key: /v1/*"},
                "managementKey": {"type": "http", "scheme": "bearer", "description": "mk_ key: /api/*"},
            },
        },
    }
