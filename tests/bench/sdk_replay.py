"""``python -m tests.bench.sdk_replay < capture.jsonl``: openai-python as a replay command, the
reference ``chunkfold replay`` is measured against (``replay_section``).

It does what a user of the SDK would write to turn captured chunks into events: each JSON Lines
chunk built as the SDK's ``Stream`` builds it, fed to the ``ChatCompletionStreamState`` of its
completion (by chunk ``id``), every event but ``chunk`` printed as JSON, then each final
completion."""

from __future__ import annotations

import sys

from openai._models import construct_type
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk


def main() -> int:
    import json

    states: dict[str, ChatCompletionStreamState[object]] = {}
    write = sys.stdout.write
    for line in sys.stdin.buffer:
        chunk = construct_type(type_=ChatCompletionChunk, value=json.loads(line))
        assert isinstance(chunk, ChatCompletionChunk)
        state = states.get(chunk.id)
        if state is None:
            state = states[chunk.id] = ChatCompletionStreamState()
        for event in state.handle_chunk(chunk):
            if event.type != "chunk":
                write(event.model_dump_json())
                write("\n")
    for state in states.values():
        write(state.get_final_completion().model_dump_json())
        write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
