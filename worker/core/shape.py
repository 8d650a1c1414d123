"""Fill in the SDK's field set on plain dicts, without building pydantic objects on the hot path.

``normalize(value, COMPLETION)`` returns what ``ParsedChatCompletion.model_dump(mode="json")``
would give for a dict of wire data: every declared field present (``None`` when absent), unknown
fields kept as they are. The shapes are derived once from the models in ``schemas.completion``.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel

from schemas import completion as wire

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


def shape_of(model: type[BaseModel]) -> Shape:
    """The field tree of ``model``: sub-models become nested shapes, everything else is opaque."""
    return {name: _node_for(field.annotation) for name, field in model.model_fields.items()}


def normalize(value: Any, shape: ShapeNode) -> Any:
    """``value`` with every field of ``shape`` present; extra keys and opaque values untouched."""
    if shape is None or value is None:
        return value
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            return value
        return [normalize(item, shape.item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {name: normalize(value.get(name), node) for name, node in shape.items()}
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
