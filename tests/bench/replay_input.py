"""Generated JSON Lines captures for the replay benchmarks (``replay_section``).

``workload(seed)``: the 98,304-chunk capture replay is timed on (48 text and 48 tool-call
completions of 1,024 chunks, interleaved at random). ``python -m tests.bench.replay_input BYTES``
writes about BYTES of capture to stdout without holding it: waves of ``CONCURRENT`` completions
(copies of the same streams under new ids) interleaved chunk by chunk, each ended by a done
envelope, so that a reader's memory can be seen to depend on the completions open at once, not
on the input's size.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

from tests.demo.synthetic import make_stream

WORKLOAD_COMPLETIONS = 96
CHUNKS_PER_COMPLETION = 1024
CONCURRENT = 64


def _streams(count: int, seed: int) -> list[tuple[bytes, list[bytes]]]:
    """``(completion id, chunk lines)`` of ``count`` streams, text and tool calls alternating."""
    out = []
    for i in range(count):
        stream = make_stream("text" if i % 2 == 0 else "tools", CHUNKS_PER_COMPLETION, seed=seed * 1000 + i)
        out.append((stream.completion_id.encode(), [chunk + b"\n" for chunk in stream.chunk_bytes]))
    return out


def workload(seed: int = 0) -> bytes:
    """The timed capture: every chunk of ``WORKLOAD_COMPLETIONS`` streams, interleaved."""
    streams = [chunks for _, chunks in _streams(WORKLOAD_COMPLETIONS, seed)]
    rng = random.Random(seed)
    cursors = [0] * len(streams)
    live = list(range(len(streams)))
    lines = []
    while live:
        i = rng.choice(live)
        lines.append(streams[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(streams[i]):
            live.remove(i)
    return b"".join(lines)


def waves(total_bytes: int, seed: int = 0) -> Iterator[bytes]:
    """About ``total_bytes`` of capture, a wave of ``CONCURRENT`` completions at a time."""
    templates = _streams(CONCURRENT, seed)
    written = wave = 0
    while written < total_bytes:
        copies = []
        for n, (old_id, chunks) in enumerate(templates):
            new_id = f"w{wave:07d}-{n:03d}-".encode().ljust(len(old_id), b"x")[: len(old_id)]
            copies.append([chunk.replace(old_id, new_id) for chunk in chunks])
        for position in range(CHUNKS_PER_COMPLETION):
            block = b"".join(copy[position] for copy in copies)
            written += len(block)
            yield block
        # each completion ends as a gateway ends it (an envelope: a bare [DONE] line would
        # belong to whichever completion the line before it did)
        ids = [
            f"w{wave:07d}-{n:03d}-".encode().ljust(len(old), b"x")[: len(old)]
            for n, (old, _) in enumerate(templates)
        ]
        yield b"".join(b'{"kind":"done","key":"%b"}\n' % completion_id for completion_id in ids)
        wave += 1


def main() -> int:
    out = sys.stdout.buffer
    for block in waves(int(sys.argv[1])):
        out.write(block)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
