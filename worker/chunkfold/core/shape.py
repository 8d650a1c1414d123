"""Fill in the SDK's field set on plain dicts, without building pydantic objects on the hot path.

``normalize(value, COMPLETION)`` returns what ``ParsedChatCompletion.model_dump(mode="json")``
would give for a dict of wire data: every declared field present (``None`` when absent), unknown
fields kept as they are. The shapes are derived once from the models in ``chunkfold_schemas.completion``.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel

from chunkfold_schemas import completion as wire

Shape = dict[str, "ShapeNode"]
ShapeNode = Union["Shape", "ListOf", None]


class ListOf:
    """A list whose items have ``item`` shape."""

    __slots__ = ("item",)

    def __init__(self, item: Shape) -> None:
        self.item = item


def _node_for(annotation: Any) -> ShapeNode:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _node_for(args[0]) if len(args) == 1 else None
    if origin is list:
        inner = _node_for(typing.get_args(annotation)[0])
        return ListOf(inner) if isinstance(inner, dict) else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return shape_of(annotation)
    return None


_SHAPES: dict[type[BaseModel], Shape] = {}


def shape_of(model: type[BaseModel]) -> Shape:
    """The field tree of ``model``: sub-models become nested shapes, everything else is opaque.
    One shape object per model, so that ``normalize`` can recognise ``TOKEN_LOGPROB`` anywhere."""
    shape = _SHAPES.get(model)
    if shape is None:
        shape = _SHAPES[model] = {
            name: _node_for(field.annotation) for name, field in model.model_fields.items()
        }
    return shape


def normalize(value: Any, shape: ShapeNode) -> Any:
    """``value`` with every field of ``shape`` present; extra keys and opaque values untouched."""
    if shape is None or value is None:
        return value
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return value
        if shape.item is TOKEN_LOGPROB:
            return [token_logprob(item) for item in value]
        return [normalize(item, shape.item) for item in value]
    if not isinstance(value, dict):
        return value
    # opaque fields are copied without a call; the extras loop runs only when there are extras
    get = value.get
    out = {name: get(name) if node is None else normalize(get(name), node) for name, node in shape.items()}
    if not value.keys() <= shape.keys():
        for key, item in value.items():
            if key not in shape:
                out[key] = item
    return out


COMPLETION: Shape = shape_of(wire.ParsedChatCompletion)
CHOICE: Shape = shape_of(wire.ParsedChoice)
MESSAGE: Shape = shape_of(wire.ParsedChatCompletionMessage)
TOOL_CALL: Shape = shape_of(wire.ParsedFunctionToolCall)
TOKEN_LOGPROB: Shape = shape_of(wire.TokenLogprob)
USAGE: Shape = shape_of(wire.CompletionUsage)


_TOKEN_FIELDS = ["token", "bytes", "logprob", "top_logprobs"]
_TOP_FIELDS = ["token", "bytes", "logprob"]
_TOP = TOKEN_LOGPROB.get("top_logprobs")
_TOKEN_FAST_PATH = (
    list(TOKEN_LOGPROB) == _TOKEN_FIELDS
    and isinstance(_TOP, ListOf)
    and list(_TOP.item) == _TOP_FIELDS
    and all(TOKEN_LOGPROB[name] is None for name in _TOP_FIELDS)
    and all(node is None for node in _TOP.item.values())
)
"""The fast path below holds for these field lists only (it is off if the models change)."""


def token_logprob(item: Any) -> Any:
    """``normalize(item, TOKEN_LOGPROB)``, built directly for the wire's usual entry (a logprob
    entry per token, so this runs for every token of a logprobs stream): exactly ``token`` /
    ``logprob`` / ``bytes`` / ``top_logprobs``, top entries exactly ``token`` / ``logprob`` /
    ``bytes``. Same content, same key order (the models' field order); anything else, normalize."""
    if _TOKEN_FAST_PATH and type(item) is dict and len(item) == 4:
        try:
            token, logprob, raw, top = item["token"], item["logprob"], item["bytes"], item["top_logprobs"]
        except KeyError:
            return normalize(item, TOKEN_LOGPROB)
        if top is None:
            return {"token": token, "bytes": raw, "logprob": logprob, "top_logprobs": None}
        if type(top) is list:
            tops = []
            for entry in top:
                if type(entry) is not dict or len(entry) != 3:
                    break
                try:
                    tops.append(
                        {"token": entry["token"], "bytes": entry["bytes"], "logprob": entry["logprob"]}
                    )
                except KeyError:
                    break
            else:
                return {"token": token, "bytes": raw, "logprob": logprob, "top_logprobs": tops}
    return normalize(item, TOKEN_LOGPROB)
