"""Engine section: chunkfold's pure fold against openai-python's ``ChatCompletionStreamState``."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import orjson
from openai import Omit, omit
from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk, ChatCompletionToolUnionParam, ParsedChatCompletion

from chunkfold.core import codec
from chunkfold.core.engine import KAFKA_OPTIONS, FoldOptions, fold
from chunkfold.core.records import decode_record
from chunkfold.core.state import AnyState, CompletionState, encode_state
from tests.bench.audio_streams import audio_records, fold_records
from tests.bench.context import BenchContext, SectionResult, Verdict
from tests.bench.measure import Timing, best_time, deep_size
from tests.bench.streams import KINDS, Stream, make_stream, sdk_inputs

SIZES = (64, 256, 1024, 4096)
RATIO_N = 1024
RATIO_KINDS = ("text", "tools")
RATIO_TARGET = 25.0
LINEARITY_TARGET = 1.5
MEMORY_FACTOR = 2.0
MEMORY_CONSTANT = 16 * 1024
CHECK_N = 256
SNAPSHOT_PROBE_N = 256
BUSY_SHARE = 0.9
AUDIO_FLUSH_EVERY = 64
"""Records between two write-behind flushes of the audio stream (the worker flushes every 1 s)."""
CHANGELOG_TARGET = 3.0
SNAPSHOT_OPTIONS = FoldOptions(snapshots=True, partial_parse=True)


def fold_stream(
    stream: Stream, options: FoldOptions = KAFKA_OPTIONS, upto: int | None = None
) -> AnyState | None:
    """Decode and fold ``stream``'s Kafka records (all of them, or the first ``upto``)."""
    state: AnyState | None = None
    for r in stream.records[:upto]:
        completion_id, record = decode_record(
            r.key, r.value, r.headers, offset=r.offset, timestamp_ms=r.timestamp_ms
        )
        state = fold(state, completion_id, record, options).state
    return state


def fold_completion(stream: Stream, options: FoldOptions = KAFKA_OPTIONS) -> Any:
    """The final completion in chunkfold's ``done`` record for ``stream`` (as a value for
    ``codec.dumps``: logprob lists are embedded JSON)."""
    state = fold_stream(stream, options, upto=-1)
    last = stream.records[-1]
    completion_id, record = decode_record(
        last.key, last.value, last.headers, offset=last.offset, timestamp_ms=last.timestamp_ms
    )
    done = fold(state, completion_id, record, options).done
    assert done is not None
    return done["completion"]


def sdk_stream(stream: Stream) -> ParsedChatCompletion[Any]:
    """openai-python's accumulation of the same chunk bytes."""
    sdk_format, sdk_tools = sdk_inputs(stream)
    response_format: Any = sdk_format or omit
    tools = cast("list[ChatCompletionToolUnionParam] | Omit", sdk_tools or omit)
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(
        response_format=response_format, input_tools=tools
    )
    for value in stream.chunk_bytes:
        chunk = cast(
            ChatCompletionChunk, construct_type(type_=ChatCompletionChunk, value=orjson.loads(value))
        )
        state.handle_chunk(chunk)
    return state.get_final_completion()


@dataclass
class _Row:
    kind: str
    n: int
    chunkfold: Timing
    sdk: Timing | None

    @property
    def ratio(self) -> float | None:
        return None if self.sdk is None else self.sdk.seconds / self.chunkfold.seconds


@dataclass
class _Memory:
    kind: str
    text: int
    retained: int
    serialized: int
    base: int
    before_finish: int
    text_before_finish: int

    def ok(self, size: int) -> bool:
        return size <= MEMORY_FACTOR * self.text + self.base and self.base <= MEMORY_CONSTANT


@dataclass
class _Results:
    rows: dict[tuple[str, int], _Row] = field(default_factory=dict)
    memory: dict[str, _Memory] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)

    def timed(self, fn: Callable[[], object], ctx: BenchContext) -> Timing:
        timing = best_time(fn, ctx.budget)
        self.timings.append(timing)
        return timing


def _rate(timing: Timing | None, n: int) -> str:
    if timing is None:
        return "skipped"
    return f"{timing.rate(n):,.0f}" + ("*" if timing.capped else "")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}x"


def _check(ctx: BenchContext, streams: dict[tuple[str, int], Stream]) -> list[str]:
    ctx.out(f"\n== engine: final completion vs openai-python's get_final_completion() (N={CHECK_N}) ==")
    mismatched: list[str] = []
    for kind in KINDS:
        stream = streams[(kind, CHECK_N)]
        ours = orjson.loads(codec.dumps(fold_completion(stream)))
        theirs = sdk_stream(stream).model_dump(mode="json", warnings=False)
        if ours != theirs:
            mismatched.append(kind)
        ctx.out(f"{kind:<12}{'identical' if ours == theirs else 'DIFFERENT'}")
    return mismatched


def _throughput(ctx: BenchContext, streams: dict[tuple[str, int], Stream], results: _Results) -> None:
    ctx.out("\n== engine: throughput, chunks/s (higher is better) ==")
    ctx.out(f"{'kind':<12}{'N':>6}  {'chunkfold':>12}  {'openai-python':>14}  {'ratio':>8}")
    for kind in KINDS:
        for n in SIZES:
            stream = streams[(kind, n)]
            ours = results.timed(partial(fold_stream, stream), ctx)
            theirs = results.timed(partial(sdk_stream, stream), ctx) if ctx.sdk_allowed(n) else None
            row = results.rows[(kind, n)] = _Row(kind, n, ours, theirs)
            ctx.out(f"{kind:<12}{n:>6}  {_rate(ours, n):>12}  {_rate(theirs, n):>14}  {_ratio(row.ratio):>8}")
    ctx.out(
        f"* fewer than 3 runs: one call took >= {ctx.budget.run_cap:g} s, so it was repeated only while the\n"
        f"  measurement stayed within {ctx.budget.max_total:g} s (a single run when one call takes longer)."
    )
    if ctx.quick:
        ctx.out("  --quick: openai-python is not timed above N=1024.")


def _linearity(ctx: BenchContext, results: _Results) -> tuple[float, str]:
    lo, hi = SIZES[0], SIZES[-1]
    ctx.out(
        f"\n== engine: linearity, chunkfold us/chunk at N={hi} / at N={lo} (target <= {LINEARITY_TARGET:g}x) =="
    )
    ctx.out(f"{'kind':<12}{f'N={lo}':>10}  {f'N={hi}':>10}  {'ratio':>7}")
    worst, worst_kind = 0.0, ""
    for kind in KINDS:
        small = results.rows[(kind, lo)].chunkfold.seconds / lo * 1e6
        large = results.rows[(kind, hi)].chunkfold.seconds / hi * 1e6
        ratio = round(large / small, 2)
        if ratio > worst:
            worst, worst_kind = ratio, kind
        ctx.out(f"{kind:<12}{small:>10.2f}  {large:>10.2f}  {ratio:>6.2f}x")
    return worst, worst_kind


def _growing_strings(ctx: BenchContext, results: _Results) -> tuple[float, float]:
    """Linearity of an audio answer (strings of the message outside the text buffers), and
    what its write-behind writes against the audio it holds."""
    lo, hi = SIZES[0], SIZES[-1]
    ctx.out(
        f"\n== engine: an audio answer's strings (audio.data, audio.transcript), chunkfold us/chunk at "
        f"N={hi} / at N={lo} (target <= {LINEARITY_TARGET:g}x) =="
    )
    per_chunk = {}
    for n in (lo, hi):
        records = audio_records(n, ctx.seed)
        timing = results.timed(partial(fold_records, records), ctx)
        per_chunk[n] = timing.seconds / n * 1e6
    ratio = round(per_chunk[hi] / per_chunk[lo], 2)
    ctx.out(f"{'kind':<12}{f'N={lo}':>10}  {f'N={hi}':>10}  {'ratio':>7}")
    ctx.out(f"{'audio':<12}{per_chunk[lo]:>10.2f}  {per_chunk[hi]:>10.2f}  {ratio:>6.2f}x")
    records = audio_records(hi, ctx.seed)
    _, written = fold_records(records, flush_every=AUDIO_FLUSH_EVERY)
    audio = sum(
        len(orjson.loads(r.value)["choices"][0]["delta"].get("audio", {}).get("data", ""))
        for r in records[:-1]
    )
    changelog = written / audio
    ctx.out(
        f"changelog: a flush every {AUDIO_FLUSH_EVERY} records wrote {written:,} B for {audio:,} B of "
        f"base64 audio ({changelog:.2f}x; target <= {CHANGELOG_TARGET:g}x)"
    )
    return ratio, changelog


def _state(stream: Stream, upto: int) -> CompletionState:
    state = fold_stream(stream, upto=upto)
    assert isinstance(state, CompletionState)
    return state


def _memory(ctx: BenchContext, streams: dict[tuple[str, int], Stream], results: _Results) -> None:
    n = SIZES[-1]
    ctx.out(f"\n== engine: state held per open completion at N={n} (every chunk folded, before [DONE]) ==")
    ctx.out(
        f"{'kind':<12}{'text B':>10}  {'retained B':>18}  {'serialized B':>18}  {'pre-finish':>10}"
        f"  {'C B':>7}  {'verdict':>7}"
    )
    for kind in KINDS:
        stream = streams[(kind, n)]
        state = _state(stream, -1)
        mem = results.memory[kind] = _Memory(
            kind,
            text=stream.text_bytes,
            retained=deep_size(state),
            serialized=len(encode_state(state)),
            base=deep_size(_state(stream, 2)),
            before_finish=deep_size(_state(stream, stream.finish_record)),
            text_before_finish=stream.text_bytes_before_finish,
        )
        verdict = "pass" if mem.ok(mem.retained) and mem.ok(mem.serialized) else "FAIL"
        ctx.out(
            f"{kind:<12}{mem.text:>10,}  {mem.retained:>11,} {mem.retained / mem.text:>5.2f}x"
            f"  {mem.serialized:>11,} {mem.serialized / mem.text:>5.2f}x"
            f"  {mem.before_finish / mem.text_before_finish:>9.2f}x  {mem.base:>7,}  {verdict:>7}"
        )
    ctx.out(
        "text B: UTF-8 bytes of content + refusal + tool arguments + JSON bytes of logprob entries.\n"
        "retained B: deep sys.getsizeof of the state object graph; serialized B: len(encode_state(state)).\n"
        "pre-finish: retained / text B with every chunk before the first finish_reason folded.\n"
        "C B: retained size after the request record and the first chunk (the fixed part).\n"
        f"target: retained and serialized <= {MEMORY_FACTOR:g} x text B + C B, with C B <= "
        f"{MEMORY_CONSTANT // 1024} KiB."
    )


def _snapshot_size(ctx: BenchContext, stream: Stream) -> int:
    """The largest size up to ``RATIO_N`` whose run is predicted (quadratically, from N=256)
    to stay within the single-run cap."""
    probe = make_stream(stream.kind, SNAPSHOT_PROBE_N, ctx.seed)
    start = time.perf_counter()
    fold_stream(probe, SNAPSHOT_OPTIONS)
    elapsed = time.perf_counter() - start
    predicted = elapsed * (RATIO_N / SNAPSHOT_PROBE_N) ** 2
    return RATIO_N if predicted <= ctx.single_run_cap else SNAPSHOT_PROBE_N


def _snapshots(ctx: BenchContext, streams: dict[tuple[str, int], Stream], results: _Results) -> None:
    ctx.out(
        f"\n== engine: opt-in FoldOptions(snapshots=True, partial_parse=True) at N={RATIO_N}, chunks/s =="
    )
    ctx.out(
        f"{'kind':<12}{'N':>6}  {'kafka opts':>12}  {'snapshots':>12}  {'openai-python':>14}  {'ratio':>8}"
    )
    reduced: list[str] = []
    for kind in KINDS:
        n = _snapshot_size(ctx, streams[(kind, RATIO_N)])
        if n != RATIO_N:
            reduced.append(kind)
        stream = streams[(kind, n)]
        row = results.rows[(kind, n)]
        timing = results.timed(partial(fold_stream, stream, SNAPSHOT_OPTIONS), ctx)
        ratio = None if row.sdk is None else row.sdk.seconds / timing.seconds
        ctx.out(
            f"{kind:<12}{n:>6}  {_rate(row.chunkfold, n):>12}  {_rate(timing, n):>12}  {_rate(row.sdk, n):>14}"
            f"  {_ratio(ratio):>8}"
        )
    ctx.out(
        "ratio: snapshots vs openai-python. Snapshot text and partial parses are O(text so far) per chunk."
    )
    if reduced:
        ctx.out(
            f"{', '.join(reduced)}: timed at N={SNAPSHOT_PROBE_N}: one run at N={RATIO_N} was predicted "
            f"(quadratically) to exceed {ctx.single_run_cap:g} s."
        )


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(ctx: BenchContext) -> SectionResult:
    started = time.perf_counter()
    load_before = _load()
    sizes = sorted({*SIZES, CHECK_N, RATIO_N})
    streams = {(kind, n): make_stream(kind, n, ctx.seed) for kind in KINDS for n in sizes}
    results = _Results()
    gc.collect()
    gc.freeze()
    mismatched = _check(ctx, streams)
    _throughput(ctx, streams, results)
    worst_linearity, worst_kind = _linearity(ctx, results)
    audio_linearity, audio_changelog = _growing_strings(ctx, results)
    _memory(ctx, streams, results)
    _snapshots(ctx, streams, results)
    gc.unfreeze()
    wall = sum(t.wall for t in results.timings)
    cpu = sum(t.cpu for t in results.timings)
    ctx.out(
        f"\nengine section: {time.perf_counter() - started:.0f} s; CPU share of the timed runs {cpu / wall:.0%};\n"
        f"load average (1/5/15 min) {load_before} before, {_load()} after"
    )
    if cpu / wall < BUSY_SHARE:
        ctx.out("  other processes competed for the CPU: absolute rates are pessimistic; ratios less so.")

    lo, hi = SIZES[0], SIZES[-1]
    ratios = {kind: results.rows[(kind, RATIO_N)].ratio for kind in RATIO_KINDS}
    mems = list(results.memory.values())
    retained = max(mems, key=lambda m: m.retained / m.text)
    serialized = max(mems, key=lambda m: m.serialized / m.text)
    verdicts = [
        Verdict(
            f"throughput vs openai-python at N={RATIO_N}: "
            + ", ".join(f"{kind} {_ratio(ratio)}" for kind, ratio in ratios.items())
            + f" (target >= {RATIO_TARGET:g}x)",
            all(r is not None and round(r, 1) >= RATIO_TARGET for r in ratios.values()),
        ),
        Verdict(
            f"linearity N={hi} vs N={lo}: worst {worst_linearity:.2f}x ({worst_kind}) "
            f"(target <= {LINEARITY_TARGET:g}x)",
            worst_linearity <= LINEARITY_TARGET,
        ),
        Verdict(
            f"audio answer: linearity N={hi} vs N={lo} {audio_linearity:.2f}x (target <= {LINEARITY_TARGET:g}x), "
            f"changelog {audio_changelog:.2f}x the audio (target <= {CHANGELOG_TARGET:g}x)",
            audio_linearity <= LINEARITY_TARGET and audio_changelog <= CHANGELOG_TARGET,
        ),
        Verdict(
            f"memory at N={hi}: retained worst {retained.retained / retained.text:.2f}x ({retained.kind}), "
            f"serialized worst {serialized.serialized / serialized.text:.2f}x ({serialized.kind}) "
            f"(target <= {MEMORY_FACTOR:g}x text + C)",
            all(m.ok(m.retained) and m.ok(m.serialized) for m in mems),
        ),
        Verdict(
            "final completions identical to openai-python's"
            + (f" (different: {', '.join(mismatched)})" if mismatched else ""),
            not mismatched,
        ),
    ]
    return SectionResult("engine", verdicts)
