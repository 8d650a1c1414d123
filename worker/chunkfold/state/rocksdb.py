"""The direct driver's local copy of its table state (``CHUNKFOLD_STORE=rocksdb://``).

Kafka Streams' checkpoint model: the changelog topic stays the source of truth, and a worker
keeps, in one RocksDB database on its own volume (``<data dir>/<app id>/direct-state``; RocksDB
locks it, so one worker per directory):

* the state entries of the changelog partitions it has owned, keyed by (partition, key);
* per changelog partition, a checkpoint: the changelog offset up to which those entries reflect
  the changelog (the next offset to read), and the wall time it was written.

A restart (or a partition coming back) loads the entries and reads the changelog only from the
checkpoint on, instead of from the beginning. Entries and checkpoints are written together in
one atomic write batch, so a checkpoint never claims records the entries do not reflect (a
crash leaves the previous, smaller checkpoint: the tail is simply read again).

A checkpoint is only as good as the changelog behind it: compaction removes a tombstone once it
is older than the topic's ``delete.retention.ms``, and a local entry whose tombstone came after
the checkpoint and was compacted away would come back. So ``usable`` rejects checkpoints older
than a given age (the driver passes half of the changelog's ``delete.retention.ms``) and
offsets outside the changelog partition's current range (topic recreated or truncated).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from chunkfold.config import Settings

ENTRY = b"e"
CHECKPOINT = b"c"
_PARTITION = struct.Struct(">I")
_CHECKPOINT_VALUE = struct.Struct(">Bqq")
FORMAT_VERSION = 1
"""Stored in every checkpoint: a checkpoint of another format is ignored (its partition is
restored from the beginning of the changelog and its entries rewritten)."""


def local_state_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / settings.app_id / "direct-state"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The local entries of a partition reflect its changelog up to ``offset`` (exclusive)."""

    offset: int
    written_at: float
    """Epoch seconds, taken no later than the newest changelog record it covers was appended."""


class LocalState:
    """One RocksDB database holding state entries and changelog checkpoints per partition."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        try:
            self.db = Rdict(str(self.path), options)
        except Exception as exc:  # rocksdict raises a bare Exception (e.g. the LOCK is held)
            raise RuntimeError(
                f"cannot open the local state at {self.path} (one worker per data directory): {exc}"
            ) from exc

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _entry_prefix(partition: int) -> bytes:
        return ENTRY + _PARTITION.pack(partition)

    @staticmethod
    def _checkpoint_key(partition: int) -> bytes:
        return CHECKPOINT + _PARTITION.pack(partition)

    # -- reads ------------------------------------------------------------------------------

    def checkpoint(self, partition: int) -> Checkpoint | None:
        raw = self.db.get(self._checkpoint_key(partition))
        if not isinstance(raw, bytes) or len(raw) != _CHECKPOINT_VALUE.size:
            return None
        version, offset, written_at_ms = _CHECKPOINT_VALUE.unpack(raw)
        if version != FORMAT_VERSION:
            return None
        return Checkpoint(offset, written_at_ms / 1000)

    def usable(
        self, partition: int, *, begin: int, end: int, now: float, max_age_s: float
    ) -> tuple[Checkpoint | None, str]:
        """The partition's checkpoint if its entries may stand in for the changelog before it:
        it exists, lies within the changelog partition's offsets [``begin``, ``end``] and is
        at most ``max_age_s`` old. Otherwise None and why."""
        checkpoint = self.checkpoint(partition)
        if checkpoint is None:
            return None, "no local checkpoint"
        if not begin <= checkpoint.offset <= end:
            return (
                None,
                f"local checkpoint {checkpoint.offset} outside the changelog's offsets {begin}..{end}",
            )
        age = now - checkpoint.written_at
        if age > max_age_s:
            return None, f"local checkpoint {age:.0f} s old (limit {max_age_s:.0f} s)"
        return checkpoint, "local checkpoint"

    def entries(self, partition: int) -> Iterator[tuple[str, bytes]]:
        """The partition's entries (key, value), in key order."""
        prefix = self._entry_prefix(partition)
        items = self.db.items(from_key=prefix)
        try:
            for raw_key, value in items:
                if not isinstance(raw_key, bytes) or not raw_key.startswith(prefix):
                    break
                yield raw_key[len(prefix) :].decode("utf-8"), value
        finally:
            del items  # an open iterator keeps the database (and its lock) alive

    # -- writes -----------------------------------------------------------------------------

    def write(
        self,
        items: Iterable[tuple[int, str, bytes | None]],
        checkpoints: Mapping[int, int],
        written_at: float,
        *,
        wipe: Iterable[int] = (),
    ) -> None:
        """One atomic batch: forget the entries of the ``wipe`` partitions, apply ``items``
        ((partition, key, value), None deletes) in order, and set the ``checkpoints``
        (partition: next changelog offset) stamped ``written_at``."""
        batch = WriteBatch(raw_mode=True)
        for partition in wipe:
            batch.delete_range(self._entry_prefix(partition), self._entry_prefix(partition + 1))
            batch.delete(self._checkpoint_key(partition))
        for partition, key, value in items:
            raw_key = self._entry_prefix(partition) + key.encode("utf-8")
            if value is None:
                batch.delete(raw_key)
            else:
                batch.put(raw_key, value)
        stamp = int(written_at * 1000)
        for partition, offset in checkpoints.items():
            batch.put(self._checkpoint_key(partition), _CHECKPOINT_VALUE.pack(FORMAT_VERSION, offset, stamp))
        self.db.write(batch)

    def wipe(self, partitions: Iterable[int]) -> None:
        """Forget the entries and checkpoints of ``partitions``."""
        self.write((), {}, 0.0, wipe=partitions)

    def close(self) -> None:
        self.db.close()
