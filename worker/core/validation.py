"""Full parses checked against a JSON Schema: structured output content and strict tool arguments."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jsonschema
import jsonschema.validators

from worker.core import codec


class SchemaValidationError(ValueError):
    """The text is not JSON, or the JSON does not satisfy the schema. Reported as ``ValidationError``."""

    error_type = "ValidationError"


@lru_cache(maxsize=512)
def _validator(schema_json: bytes) -> jsonschema.protocols.Validator:
    schema = codec.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def parse_and_validate(text: str | None, schema_json: bytes | None) -> Any:
    """The JSON value of ``text``; checked against ``schema_json`` (canonical JSON bytes) when given."""
    if text is None:
        raise SchemaValidationError("no JSON text")
    try:
        value = codec.loads_value(text)
    except codec.DecodeError as exc:
        raise SchemaValidationError(f"invalid JSON: {exc}") from None
    if schema_json is not None:
        error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise SchemaValidationError(f"{where}: {error.message}")
    return value
