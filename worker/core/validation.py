"""Full parses checked against a JSON Schema: structured output content and strict tool arguments."""

from __future__ import annotations

import re
from collections.abc import Callable
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
    if schema_json is not None and not _accepts(schema_json, value):
        error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise SchemaValidationError(f"{where}: {error.message}")
    return value


# ---------------------------------------------------------------------------------------------
# a quick acceptance check for the common schemas, in front of jsonschema

Check = Callable[[Any], bool]
"""``check(value)`` True: ``value`` is certainly valid; False: "ask jsonschema", not "invalid"."""

_TYPES: dict[str, frozenset[type]] = {
    "string": frozenset((str,)),
    "integer": frozenset((int,)),
    "number": frozenset((int, float)),
    "boolean": frozenset((bool,)),
    "null": frozenset((type(None),)),
    "object": frozenset((dict,)),
    "array": frozenset((list,)),
}
"""Exact Python types (as jiter produces them) that certainly satisfy each JSON type: a float
that is integral also satisfies ``integer`` for jsonschema, but is left to it."""

_ANNOTATIONS = frozenset(
    (
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
    )
)
"""Keywords that never reject a value (``format`` asserts nothing without a format checker)."""
_LOCAL_REF = re.compile(r"#/\$defs/([A-Za-z0-9_.\-]+)")
_APPLICATORS = frozenset(("type", "enum", "properties", "required", "additionalProperties", "items", "anyOf"))


def _accepts(schema_json: bytes, value: Any) -> bool:
    try:
        return _certainly_valid(schema_json)(value)
    except RecursionError:  # a cycle of references that consumes no value, or a very deep value
        return False


def _never(value: Any) -> bool:
    return False


def _always(value: Any) -> bool:
    return True


@lru_cache(maxsize=512)
def _certainly_valid(schema_json: bytes) -> Check:
    """A check that accepts only values the Draft 2020-12 validator accepts too.

    It understands ``type``, string ``enum``, ``properties``, ``required``,
    ``additionalProperties``, ``items``, ``anyOf`` (through its first branch), local ``$ref``s
    to ``#/$defs/<name>`` and the annotation keywords. A subschema with any other keyword (or a
    root naming ``$schema`` or ``$id``) accepts nothing, so jsonschema decides, and reports
    errors, exactly as without the check. Only subschemas jsonschema evaluates are evaluated.
    """
    schema = codec.loads(schema_json)
    if type(schema) is dict and ("$schema" in schema or "$id" in schema):
        return _never
    return _Compiler(schema).check(schema, root=True)


class _Compiler:
    def __init__(self, root: Any) -> None:
        defs = root.get("$defs") if type(root) is dict else None
        self.defs: dict[str, Any] = defs if type(defs) is dict else {}
        self.refs: dict[str, Check] = {}

    def check(self, schema: Any, root: bool = False) -> Check:
        if schema is True:
            return _always
        if type(schema) is not dict:
            return _never
        keywords = schema.keys() - _ANNOTATIONS
        if root:
            keywords.discard("$defs")
        if keywords == {"$ref"}:
            return self._ref(schema["$ref"])
        if not keywords <= _APPLICATORS:
            return _never
        return self._node(schema)

    def _ref(self, ref: Any) -> Check:
        match = _LOCAL_REF.fullmatch(ref) if type(ref) is str else None
        name = match.group(1) if match else None
        if name is None or name not in self.defs:
            return _never
        if name not in self.refs:
            target: list[Check] = [_never]
            self.refs[name] = lambda value: target[0](value)  # recursive schemas refer to themselves
            target[0] = self.check(self.defs[name])
        return self.refs[name]

    def _node(self, schema: dict[str, Any]) -> Check:
        types = _type_set(schema.get("type"))
        enum = schema.get("enum")
        strings = frozenset(enum) if type(enum) is list and all(type(e) is str for e in enum) else None
        required = schema.get("required", [])
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties", True)
        items = schema.get("items", True)
        any_of = schema.get("anyOf")
        if (
            types is None
            or (enum is not None and strings is None)
            or type(required) is not list
            or any(type(name) is not str for name in required)
            or type(properties) is not dict
            or (any_of is not None and (type(any_of) is not list or not any_of))
        ):
            return _never
        required_names = frozenset(required)
        property_checks = {name: self.check(sub) for name, sub in properties.items()}
        closed = additional is False
        additional_check = _always if additional is True or closed else self.check(additional)
        items_check = self.check(items)
        # jsonschema tries the branches in order and stops at the first valid one: only the first
        # branch can be taken as certain (a later one is reached only after an earlier one failed,
        # and the earlier one may fail by raising, e.g. on an unresolvable reference)
        first_branch = self.check(any_of[0]) if any_of is not None else None

        def check(value: Any) -> bool:
            kind = type(value)
            if types and kind not in types:
                return False
            if strings is not None and (kind is not str or value not in strings):
                return False
            if first_branch is not None and not first_branch(value):
                return False
            if kind is dict:
                if not value.keys() >= required_names:
                    return False
                for name, item in value.items():
                    sub = property_checks.get(name)
                    if sub is None:
                        if closed or not additional_check(item):
                            return False
                    elif not sub(item):
                        return False
            elif kind is list and items_check is not _always:
                return all(items_check(item) for item in value)
            return True

        return check


def _type_set(spec: Any) -> frozenset[type] | None:
    """The exact types a ``type`` keyword certainly accepts (empty: any); None if not understood."""
    if spec is None:
        return frozenset()
    names = [spec] if type(spec) is str else spec
    if type(names) is not list or not names or any(type(n) is not str or n not in _TYPES for n in names):
        return None
    return frozenset().union(*(_TYPES[n] for n in names))
