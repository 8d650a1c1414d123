"""What every benchmark section gets (options, output) and gives back (pass/fail verdicts)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import TextIO

from tests.bench.measure import Budget

FULL_BUDGET = Budget()
QUICK_BUDGET = Budget(run_min=0.01, repeat=3, min_total=0.08, max_runs=8, run_cap=0.3, max_total=1.0)
QUICK_SDK_MAX_N = 1024
FULL_SINGLE_RUN_CAP = 10.0
QUICK_SINGLE_RUN_CAP = 2.0


@dataclass(frozen=True)
class BenchContext:
    quick: bool = False
    seed: int = 0
    cpu_clock: bool = False
    output: TextIO = field(default_factory=lambda: sys.stdout)

    @property
    def budget(self) -> Budget:
        return replace(QUICK_BUDGET if self.quick else FULL_BUDGET, cpu_clock=self.cpu_clock)

    @property
    def single_run_cap(self) -> float:
        """Seconds one call of an optional quadratic measurement may take."""
        return QUICK_SINGLE_RUN_CAP if self.quick else FULL_SINGLE_RUN_CAP

    def sdk_allowed(self, n_chunks: int) -> bool:
        """Whether to time openai-python at this size (``--quick`` skips its quadratic large runs)."""
        return not self.quick or n_chunks <= QUICK_SDK_MAX_N

    def out(self, line: str = "") -> None:
        print(line, file=self.output, flush=True)


@dataclass(frozen=True)
class Verdict:
    text: str
    ok: bool


@dataclass(frozen=True)
class SectionResult:
    name: str
    verdicts: list[Verdict]
