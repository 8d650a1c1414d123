"""Make an output record fit its topic: the size policy.

Kafka rejects a record batch larger than the topic's ``max.message.bytes``, and a record that
can never be sent would stop its partition (the worker cannot commit past it). So every value
the worker publishes goes through ``fit``: a value within its budget is published as it is
(the common case costs one length comparison); a larger one is cut, deterministically, and
still published:

- strings are cut to a prefix (base64 fields, named ``*_b64``, to whole 4-character groups, so
  the kept prefix decodes), arrays to a prefix of their items, largest first, descending
  into the element that holds the excess (so a long ``content`` is cut before a choice is
  dropped); objects keep all their keys;
- each cut is listed in the value's ``truncated`` array with its JSON Pointer ``path``, the
  ``original_bytes`` and ``kept_bytes`` (UTF-8 bytes of a string, JSON bytes of an array) and
  the ``sha256`` of the original (of the string's UTF-8, of the array's JSON), so a consumer
  can tell a cut value from a whole one and check a copy rebuilt from elsewhere (the events
  topic carries every delta; the input topic the request).

The result depends only on the value and the budget, so a redelivered record is cut the same
way after a crash.
"""

from __future__ import annotations

import hashlib
from typing import Any

from chunkfold.core import codec

RECORD_OVERHEAD_BYTES = 1024
"""Room kept for what Kafka adds around a value in a batch of one record (batch header, record
header, varints, timestamps) besides the key: about 100 bytes; the rest is margin."""
MIN_CUT_BYTES = (4096, 256)
"""Nodes smaller than this are not cut, per pass: first only large nodes, then smaller ones
(never below 256 bytes: a cut's ``truncated`` entry costs about 200)."""
ENTRY_BYTES = 200
"""About what one ``truncated`` entry adds (plus its path): a new cut removes this much more."""


MIN_OUTPUT_BYTES = 16 * 1024
"""The smallest record limit an output topic may have (``CHUNKFOLD_MAX_MESSAGE_BYTES`` and the
topics' ``max.message.bytes``, checked at start): room for a 2 KiB key (``records.max_key_bytes``)
and its outputs' essential fields."""
ESSENTIAL_ROOM_BYTES = 1024
"""What a value cut to its ``ESSENTIAL_KEYS`` takes at most besides its ``completion_id``: those
short fields and the one ``truncated`` entry (about 200 bytes)."""
ESSENTIAL_KEYS = ("version", "type", "completion_id", "choice_index", "seq", "status", "reason")
"""What a value keeps when cutting cannot make it fit (only objects with very many small
members get there): these keys, and one ``truncated`` entry for the whole value (path "")."""


def value_budget(limit: int, key: bytes) -> int:
    """The largest value that fits a topic whose records may be ``limit`` bytes."""
    return limit - len(key) - RECORD_OVERHEAD_BYTES


def encode(value: dict[str, Any], limit: int, key: bytes) -> tuple[bytes, int]:
    """``value`` as the JSON of a record keyed ``key`` on a topic whose records may be ``limit``
    bytes (cut to fit when larger), and the size of its whole JSON: larger than the bytes
    returned when it was cut. The one encoding of every output, the worker's and replay's."""
    data = codec.dumps(value)
    budget = value_budget(limit, key)
    if len(data) <= budget:
        return data, len(data)
    return fit(value, budget), len(data)


def fit(value: dict[str, Any], budget: int) -> bytes:
    """``value`` as JSON bytes of at most ``budget`` bytes (see the module docstring). Raises
    ``ValueError`` only when even its ``ESSENTIAL_KEYS`` exceed the budget."""
    original = codec.dumps(value)
    if len(original) <= budget:
        return original
    plain = codec.plain(value)
    cuts: dict[str, dict[str, Any]] = {}
    for min_cut in MIN_CUT_BYTES:
        for _ in range(4):
            data = _with_cuts(plain, cuts)
            if len(data) <= budget:
                return data
            skip = ("truncated", *ESSENTIAL_KEYS)
            if _shrink_members(plain, "", len(data) - budget, min_cut, cuts, skip=skip) == 0:
                break
    data = _with_cuts(plain, cuts)
    if len(data) <= budget:
        return data
    whole: dict[str, dict[str, Any]] = {}
    _record(whole, "", original, 0)
    essentials = {k: plain[k] for k in ESSENTIAL_KEYS if k in plain}
    data = _with_cuts(essentials, whole)
    if len(data) > budget:
        raise ValueError(f"the essential fields of a value take {len(data)} bytes, budget {budget}")
    return data


def _with_cuts(value: dict[str, Any], cuts: dict[str, dict[str, Any]]) -> bytes:
    """``value`` with its ``truncated`` list, as JSON bytes."""
    value["truncated"] = list(cuts.values())
    return codec.dumps(value)


def _size(node: Any) -> int:
    return len(codec.dumps(node))


def _shrink_members(
    node: dict[str, Any] | list[Any],
    path: str,
    excess: int,
    min_cut: int,
    cuts: dict[str, dict[str, Any]],
    skip: tuple[str, ...] = (),
) -> int:
    """Shrink the members of a container, largest first, until ``excess`` bytes are gone;
    returns the bytes removed."""
    items = enumerate(node) if isinstance(node, list) else node.items()
    members = sorted(
        (
            (_size(child), name)
            for name, child in items
            if name not in skip and isinstance(child, str | list | dict)
        ),
        key=lambda pair: -pair[0],
    )
    removed = 0
    for size, name in members:
        if size < min_cut or removed >= excess:
            break
        removed += _shrink(node, name, f"{path}/{_pointer(name)}", excess - removed, min_cut, cuts)
    return removed


def _shrink(
    parent: Any, name: Any, path: str, excess: int, min_cut: int, cuts: dict[str, dict[str, Any]]
) -> int:
    node = parent[name]
    if isinstance(node, str):
        return _cut_string(parent, name, path, excess, cuts)
    if isinstance(node, dict):
        return _shrink_members(node, path, excess, min_cut, cuts)
    assert isinstance(node, list)
    if node and _size(max(node, key=_size)) >= excess:
        return _shrink_members(node, path, excess, min_cut, cuts)
    return _cut_array(parent, name, path, excess, min_cut, cuts)


def _cut_string(parent: Any, name: Any, path: str, excess: int, cuts: dict[str, dict[str, Any]]) -> int:
    text: str = parent[name]
    before = _size(text)
    target = max(2, before - excess - _entry_cost(cuts, path))
    low, high = 0, len(text)
    while low < high:  # the longest prefix whose JSON is within the target
        mid = (low + high + 1) // 2
        if _size(text[:mid]) <= target:
            low = mid
        else:
            high = mid - 1
    if path.endswith("_b64"):
        low -= low % 4  # base64 keeps whole 4-character groups, so the prefix still decodes
    kept = text[:low]
    _record(cuts, path, text.encode("utf-8"), len(kept.encode("utf-8")))
    parent[name] = kept
    return before - _size(kept)


def _cut_array(
    parent: Any, name: Any, path: str, excess: int, min_cut: int, cuts: dict[str, dict[str, Any]]
) -> int:
    """Drop items from the end while they do not cover the excess, then shrink the new last
    item for the rest, dropping it too if it cannot give enough (so the array keeps a prefix
    of what it held)."""
    items: list[Any] = parent[name]
    before = _size(items)
    original = codec.dumps(items)
    count = len(items)
    excess += _entry_cost(cuts, path)
    removed = 0
    while items and removed < excess:
        last = len(items) - 1
        size = _size(items[last]) + 1
        if removed + size > excess and size > min_cut and isinstance(items[last], str | list | dict):
            removed += _shrink(items, last, f"{path}/{last}", excess - removed, min_cut, cuts)
            if removed >= excess:
                break
            for nested in [p for p in cuts if p == f"{path}/{last}" or p.startswith(f"{path}/{last}/")]:
                del cuts[nested]
            size = _size(items[last]) + 1
        items.pop()
        removed += size
    if len(items) < count:
        _record(cuts, path, original, _size(items))
    return before - _size(items)


def _entry_cost(cuts: dict[str, dict[str, Any]], path: str) -> int:
    return 0 if path in cuts else ENTRY_BYTES + len(path)


def _record(cuts: dict[str, dict[str, Any]], path: str, original: bytes, kept_bytes: int) -> None:
    """Note a cut at ``path``; a second cut of the same node keeps the first original."""
    entry = cuts.get(path)
    if entry is None:
        cuts[path] = {
            "path": path,
            "original_bytes": len(original),
            "kept_bytes": kept_bytes,
            "sha256": hashlib.sha256(original).hexdigest(),
        }
    else:
        entry["kept_bytes"] = kept_bytes


def _pointer(name: Any) -> str:
    """One JSON Pointer (RFC 6901) reference token."""
    return str(name).replace("~", "~0").replace("/", "~1")
