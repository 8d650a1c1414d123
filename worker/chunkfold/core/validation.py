"""Full parses checked against a JSON Schema: structured output content and strict tool arguments.

Schemas come from request context records and values from model output: both are untrusted.
``check_schema`` vets a schema once, when the request context is folded. Validation never
fetches a ``$ref`` (the registry holds only the schema itself and the metaschemas), runs every
regex of a schema on RE2 (linear time: no ReDoS), and spends steps from a ``Budget``: one per
keyword evaluated, more for costly ones, and a bounded nesting depth. Every bound counts steps,
not time, so a replay of the same records after a crash reaches the same verdicts. Whatever a
schema does to jsonschema ends as a ``SchemaValidationError``, never as another exception.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import attrs
import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import jsonschema.validators
import re2  # type: ignore[import-untyped]
import referencing

from chunkfold.core import codec

VALIDATION_STEPS = 100_000
"""Steps all validations of one completion may spend together (the engine keeps the count in its
state). A step is a keyword evaluated, a subschema entered or an error passed up, a few us each:
the bound is well under a second per completion, and about 40 KB of typical structured output
(validated at its done event and again for the final completion) fits in it."""
SCHEMA_CHECK_STEPS = 100_000
"""Steps ``check_schema`` may spend on one schema: about 60 KB of schema (OpenAI's own limits on
structured output schemas keep them far below)."""
MAX_DEPTH = 200
"""Keyword evaluations nested in one another (a ``$ref`` that refers to itself never ends):
deep enough for any real schema and value, and well inside Python's recursion limit, so the
bound is reached before a ``RecursionError`` whose place would depend on the caller's stack."""


class SchemaValidationError(ValueError):
    """The text is not JSON, or the JSON does not satisfy the schema. Reported as ``ValidationError``."""

    error_type = "ValidationError"


class _OutOfSteps(Exception):
    pass


class _TooDeep(Exception):
    pass


@dataclass(slots=True)
class Budget:
    """Validation steps that may still be spent (``left``) and what calls with it spent."""

    left: int
    spent: int = 0
    depth: int = 0

    def spend(self, steps: int) -> None:
        """Charge ``steps``; raises ``_OutOfSteps`` (having charged all that was left) past the end."""
        if self.spent + steps > self.left:
            self.spent = self.left
            raise _OutOfSteps
        self.spent += steps

    def exhaust(self) -> None:
        self.spent = self.left


_METER: ContextVar[Budget | None] = ContextVar("chunkfold_validation_budget", default=None)


@contextmanager
def _metered_by(budget: Budget) -> Iterator[None]:
    token = _METER.set(budget)
    try:
        yield
    finally:
        _METER.reset(token)


def parse_and_validate(text: str | None, schema_json: bytes | None, budget: Budget | None = None) -> Any:
    """The JSON value of ``text``; checked against ``schema_json`` (canonical JSON bytes) when
    given, spending steps from ``budget`` (a fresh ``VALIDATION_STEPS`` when None)."""
    if text is None:
        raise SchemaValidationError("no JSON text")
    try:
        value = codec.loads_value(text)
    except codec.DecodeError as exc:
        raise SchemaValidationError(f"invalid JSON: {exc}") from None
    if schema_json is not None and not _accepts(schema_json, value):
        problem = _first_error(schema_json, value, budget or Budget(VALIDATION_STEPS))
        if problem is not None:
            raise SchemaValidationError(problem)
    return value


def _first_error(schema_json: bytes, value: Any, budget: Budget) -> str | None:
    """What is wrong with ``value`` under the schema (None: nothing), or why it could not be
    decided: the budget ran out, the evaluation nested too deep, or the schema could not be
    applied (e.g. a ``$ref`` to anything outside it)."""
    if budget.spent >= budget.left:
        return "not validated: the completion's validation budget is spent"
    try:
        with _metered_by(budget):
            error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(value))
    except _OutOfSteps:
        return f"not validated: the validation budget ({VALIDATION_STEPS} steps per completion) ran out"
    except _TooDeep:
        return f"not validated: the schema's evaluation nests deeper than {MAX_DEPTH} levels"
    except RecursionError:  # a last resort (MAX_DEPTH comes first): where it hits depends on the stack
        budget.exhaust()
        return "not validated: the schema's evaluation recursed too deep"
    except Exception as exc:  # jsonschema on an untrusted schema: an unresolvable $ref and the like
        return f"not validated: the schema cannot be applied ({type(exc).__name__}: {_first_line(exc)})"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


@lru_cache(maxsize=512)
def check_schema(schema_json: bytes) -> str | None:
    """Why the schema cannot be used (None: it can): it is not valid under its metaschema, one of
    its regexes is not one RE2 runs (lookaround, backreference: they need backtracking), or it
    is too large or nested to check within ``SCHEMA_CHECK_STEPS`` / ``MAX_DEPTH``."""
    schema = codec.loads(schema_json)
    budget = Budget(SCHEMA_CHECK_STEPS)
    try:
        with _metered_by(budget):
            cls = _metered_class(_declared_class(schema))
            checker = cls(cls.META_SCHEMA, format_checker=_REGEX_FORMAT, registry=_NO_RETRIEVAL)
            error = jsonschema.exceptions.best_match(checker.iter_errors(schema))
    except _OutOfSteps:
        return f"too large to check within {SCHEMA_CHECK_STEPS} steps"
    except (_TooDeep, RecursionError):
        return f"nested deeper than {MAX_DEPTH} levels"
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0]


def _declared_class(schema: Any) -> type[jsonschema.protocols.Validator]:
    """The validator class of the draft the schema names in ``$schema`` (2020-12 by default)."""
    cls: type[jsonschema.protocols.Validator] = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    return cls


@lru_cache(maxsize=512)
def _validator(schema_json: bytes) -> jsonschema.protocols.Validator:
    schema = codec.loads(schema_json)
    return _metered_class(_declared_class(schema))(schema, registry=_NO_RETRIEVAL)


_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()
"""A registry that retrieves nothing: a ``$ref`` resolves within the schema (or to a metaschema
jsonschema ships) or not at all; it is never fetched."""


# ---------------------------------------------------------------------------------------------
# metering: every keyword evaluation is charged and nested evaluations are bounded

Keyword = Callable[[Any, Any, Any, Any], Any]


@lru_cache(maxsize=16)
def _metered_class(cls: type[jsonschema.protocols.Validator]) -> type[jsonschema.protocols.Validator]:
    """``cls`` with each keyword charging the active budget before it runs, and evolving into
    metered classes only: jsonschema's ``evolve`` picks the class of a subschema's own
    ``$schema`` (a metaschema's subschemas all name one), which would escape the budget."""
    if getattr(cls, "_chunkfold_metered", False):
        return cls
    keywords = {name: _metered(name, apply) for name, apply in cls.VALIDATORS.items()}
    metered: type[jsonschema.protocols.Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, keywords
    )
    setattr(metered, "_chunkfold_metered", True)  # noqa: B010
    setattr(metered, "evolve", _metered_evolve)  # noqa: B010
    return metered


def _metered_evolve(self: Any, **changes: Any) -> Any:
    """jsonschema's ``evolve`` (the validator for another schema, other fields kept), metered:
    every subschema evaluation starts here."""
    budget = _METER.get()
    if budget is not None:
        budget.spend(1)
    schema = changes.setdefault("schema", self.schema)
    cls = _metered_class(jsonschema.validators.validator_for(schema, default=type(self)))
    own_class: type[jsonschema.protocols.Validator] = type(self)
    for name, alias in _init_fields(own_class):
        if alias not in changes:
            changes[alias] = getattr(self, name)
    return cls(**changes)


@lru_cache(maxsize=16)
def _init_fields(cls: type[jsonschema.protocols.Validator]) -> tuple[tuple[str, str], ...]:
    """The (attribute, ``__init__`` argument) names of a validator class's fields."""
    fields: Any = attrs.fields(cls)  # type: ignore[arg-type]  # validator classes are attrs classes
    return tuple((field.name, field.alias) for field in fields if field.init)


def _metered(name: str, apply: Keyword) -> Keyword:
    def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[Any]:
        budget = _METER.get()
        if budget is None:  # not reached: these validators are used only inside _metered_by
            raise _OutOfSteps
        budget.spend(_cost(name, value, instance))
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise _TooDeep
            for error in apply(validator, value, instance, schema) or ():
                budget.spend(1)  # each level an error passes up decorates it
                yield error
        finally:
            budget.depth -= 1

    return keyword


def _cost(name: str, value: Any, instance: Any) -> int:
    """Steps for one keyword evaluation: one, or the work the keyword does beyond its subschemas
    (``uniqueItems`` compares every pair of unsortable items; ``enum`` every member)."""
    if name == "uniqueItems" and value is True and type(instance) is list:
        n = len(instance)
        kinds = {type(item) for item in instance}
        return n if kinds <= {str} or kinds <= {int, float} else 1 + n * n // 2
    if name == "enum" and type(value) is list:
        return 1 + len(value)
    return 1


# ---------------------------------------------------------------------------------------------
# regexes: RE2 (linear time) for every pattern jsonschema runs while a budget is active


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False
    return options


_RE2_OPTIONS = _re2_options()


@lru_cache(maxsize=1024)
def _linear_regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2; raises ``re2.error`` for what RE2 does not run."""
    return re2.compile(pattern, _RE2_OPTIONS)


class _RegexModule:
    """Stands in for ``re`` in jsonschema's keyword modules, which call ``re.search`` for
    ``pattern``, ``patternProperties`` and, through those, ``additionalProperties`` and
    ``unevaluatedProperties``: while a budget is active the search runs on RE2 and is charged
    by the length of the text; otherwise (any other user of jsonschema) it is ``re.search``."""

    def search(self, pattern: str, string: str, flags: int = 0) -> Any:
        budget = _METER.get()
        if budget is None:
            return re.search(pattern, string, flags)
        budget.spend(1 + len(string) // 16)
        return _linear_regex(pattern).search(string)

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


for _module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
    setattr(_module, "re", _RegexModule())  # noqa: B010 (mypy: the modules' re is typed as re)

_REGEX_FORMAT = jsonschema.FormatChecker(formats=())
"""The metaschemas' ``format: regex`` (pattern values, patternProperties names) as RE2 compiles."""


@_REGEX_FORMAT.checks("regex", raises=re2.error)
def _is_linear_regex(instance: object) -> bool:
    if isinstance(instance, str):
        _linear_regex(instance)
    return True


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
