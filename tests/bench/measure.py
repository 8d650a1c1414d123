"""Timing and memory helpers shared by the benchmark sections."""

from __future__ import annotations

import enum
import gc
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter, process_time


@dataclass(frozen=True, slots=True)
class Budget:
    """A measurement loops the call into runs of at least ``run_min`` seconds and takes the best
    of at least ``repeat`` runs, adding runs (up to ``max_runs``) until ``min_total`` seconds are
    spent. A call of at least ``run_cap`` seconds is a run on its own, repeated (up to ``repeat``
    times) only while the total stays within ``max_total``. ``cpu_clock``: rank runs by
    ``time.process_time`` instead of ``time.perf_counter`` (for a machine shared with other work)."""

    run_min: float = 0.02
    repeat: int = 5
    min_total: float = 0.4
    max_runs: int = 25
    run_cap: float = 1.0
    max_total: float = 4.0
    cpu_clock: bool = False


@dataclass(frozen=True, slots=True)
class Timing:
    """``seconds``: the best time of one call (wall-clock, or CPU with ``cpu_clock``); ``wall``/``cpu``: totals over every timed
    run (their ratio is the CPU share the process got: below 1 when other processes competed)."""

    seconds: float
    runs: int
    loops: int
    wall: float
    cpu: float

    @property
    def capped(self) -> bool:
        return self.loops == 1 and self.runs < 3

    def rate(self, items: int) -> float:
        return items / self.seconds


def _run(fn: Callable[[], object], loops: int) -> tuple[float, float]:
    gc.collect()
    cpu = process_time()
    start = perf_counter()
    for _ in range(loops):
        fn()
    return perf_counter() - start, process_time() - cpu


def best_time(fn: Callable[[], object], budget: Budget) -> Timing:
    """Best seconds per call of ``fn`` (the first call is a warm-up unless it is slow)."""
    first = _run(fn, 1)
    if first[0] >= budget.run_cap:
        runs, loops = [first], 1
        while len(runs) < budget.repeat and sum(r[0] for r in runs) + first[0] <= budget.max_total:
            runs.append(_run(fn, 1))
    else:
        runs, loops = [], max(1, math.ceil(budget.run_min / max(first[0], 1e-9)))
        while len(runs) < budget.repeat or (
            sum(r[0] for r in runs) < budget.min_total and len(runs) < budget.max_runs
        ):
            runs.append(_run(fn, loops))
    best = min(r[1] if budget.cpu_clock else r[0] for r in runs)
    return Timing(best / loops, len(runs), loops, sum(r[0] for r in runs), sum(r[1] for r in runs))


_LEAVES = (str, bytes, bytearray, int, float, complex, memoryview, range)
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, enum.Enum, bool)


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return names


def deep_size(root: object) -> int:
    """``sys.getsizeof`` summed over every object reachable from ``root`` (each counted once):
    dict keys and values, list/tuple/set items, ``__slots__`` and ``__dict__`` attributes.
    Shared singletons (None, bools, small ints, classes, enums) are not counted."""
    seen: set[int] = set()
    stack: list[object] = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, _SHARED) or id(obj) in seen:
            continue
        if type(obj) is int and -5 <= obj <= 256:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, _LEAVES):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, name) for name in _slot_names(type(obj)) if hasattr(obj, name))
            instance_dict = getattr(obj, "__dict__", None)
            if instance_dict is not None:
                stack.append(instance_dict)
    return total
