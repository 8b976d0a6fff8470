"""Validate the service's answers against its OpenAPI document (datastore/service/openapi.yaml)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parent.parent / "datastore" / "service" / "openapi.yaml"


@cache
def spec() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text())


@cache
def _templates() -> list[tuple[re.Pattern, str]]:
    out = []
    for template in spec()["paths"]:
        rx = re.escape(template).replace(r"\{path\}", ".+")  # a file's path may contain '/'
        rx = "^" + re.sub(r"\\\{(\w+)\\\}", r"[^/]+", rx) + "$"
        out.append((re.compile(rx), template))
    # literal paths win over templated ones (/shares/pending vs /shares/{share_id}/…)
    return sorted(out, key=lambda x: x[1].count("{"))


def template_for(path: str) -> str | None:
    path = path.split("?", 1)[0]
    for rx, template in _templates():
        if rx.match(path):
            return template
    return None


def _resolve(schema: dict) -> dict:
    return {**schema, "components": spec()["components"]}


def validate(method: str, path: str, status: int, body) -> None:
    """Raise AssertionError when the answer does not match the document."""
    template = template_for(path)
    assert template, f"{method} {path}: not in the OpenAPI document"
    op = spec()["paths"][template].get(method.lower())
    if op is None and status == 405:  # an undocumented method is refused with the Error shape
        op = {"responses": {"default": {"$ref": "#/components/responses/Error"}}}
    assert op, f"{method} {template}: method not in the OpenAPI document"
    responses = op["responses"]
    response = responses.get(str(status)) or responses.get("default")
    assert response, f"{method} {template}: status {status} not documented"
    if "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        response = spec()["components"]["responses"][name]
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        return
    try:
        jsonschema.validate(body, _resolve(schema), cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{method} {path} → {status}: {e.message} at {list(e.absolute_path)}") from None
