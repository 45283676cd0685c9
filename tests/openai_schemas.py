"""OpenAI's own response schemas, to check the front door's bodies against: every chat.completion,
chunk, error and model list it answers must validate (tests/e2e/test_front_door.py).

tests/fixtures/openai-schemas.json holds the schemas these shapes need, taken from the
`openai/openai-openapi` repository's openapi.json at SPEC_COMMIT with everything they refer to,
and nothing else; OpenAPI's `nullable: true` is written as JSON Schema's `"null"` alternative.
Regenerate from a checkout of that repository (and update SPEC_COMMIT):

    python -m tests.openai_schemas path/to/openai-openapi/openapi.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPEC_COMMIT = "f85dbe223d40e1a31cba812ab2d755c7e98a92a3"  # openai/openai-openapi, 2026-08-21
FILE = Path(__file__).resolve().parent / "fixtures" / "openai-schemas.json"
ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ErrorResponse",
         "ListModelsResponse", "Model")


def _refs(value: Any):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item.rsplit("/", 1)[-1]
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def _nullable(value: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema: the schema or null."""
    if isinstance(value, list):
        return [_nullable(v) for v in value]
    if not isinstance(value, dict):
        return value
    converted = {k: _nullable(v) for k, v in value.items() if k != "nullable"}
    return {"anyOf": [converted, {"type": "null"}]} if value.get("nullable") else converted


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    """ROOTS and every schema they refer to, from an openapi.json."""
    schemas, todo, kept = spec["components"]["schemas"], list(ROOTS), {}
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = _nullable(schemas[name])
            todo.extend(_refs(schemas[name]))
    return {"source": f"openai/openai-openapi openapi.json at {SPEC_COMMIT}",
            "components": {"schemas": dict(sorted(kept.items()))}}


def validate(name: str, body: Any) -> None:
    """Raise jsonschema.ValidationError unless `body` is a valid `name` (one of ROOTS)."""
    import jsonschema

    document = json.loads(FILE.read_text())
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


if __name__ == "__main__":
    FILE.write_text(json.dumps(extract(json.loads(Path(sys.argv[1]).read_text())), indent=1)
                    + "\n")
    print(f"wrote {FILE}")
