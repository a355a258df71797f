"""Validate a rendered object against a CRD's schema as an API server would, but strictly.

Vendored upstream CRDs (tests/operator/schemas/, each with its source and licence in its header) stand in for
the projects' API servers: the object must pass the OpenAPI schema (Draft 4 semantics, as OpenAPI 3.0) and
every x-kubernetes-validations rule (CEL, create-time rules only). Unlike an API server, which prunes fields a
structural schema does not know, an unknown field is an error here: a misspelt field would otherwise vanish.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

SCHEMAS = Path(__file__).parent / "schemas"


def crd_schema(file: str, version: str) -> dict[str, Any]:
    crd = next(d for d in yaml.safe_load_all((SCHEMAS / file).read_text()) if d)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return served["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with additionalProperties false wherever a structural schema would prune."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for sub in node.get("properties", {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is validated by the API server itself
    return schema


def _cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    errors: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if not result:
            errors.append(f"{path}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += _cel_errors(sub, value[key], f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, sub_value in value.items():
                errors += _cel_errors(schema["additionalProperties"], sub_value, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server does before validating."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = with_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [with_defaults(schema["items"], v) for v in value]
    return value


def validation_errors(obj: dict[str, Any], file: str, version: str) -> list[str]:
    """Schema errors, then CEL rule messages, of `obj` against the CRD in `file`; [] when it is accepted."""
    schema = crd_schema(file, version)
    obj = with_defaults(schema, obj)
    errors = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft4Validator(strict(schema)).iter_errors(obj)]  # fmt: skip
    return errors or [e.removeprefix(".") for e in _cel_errors(schema, obj, "")]
