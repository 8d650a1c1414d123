"""``KeyPartitions``: the partition of a record key, as aiokafka's default partitioner picks it,
computed once per key (murmur2 is pure Python in aiokafka: about 5 us for a completion id, and
every output record of a completion has the same key)."""

from __future__ import annotations

from aiokafka.partitioner import murmur2

PARTITION_CACHE_SIZE = 100_000


class KeyPartitions:
    """Partitions of keys on topics whose partition counts are ``counts``: the partition
    ``(murmur2(key) & 0x7FFFFFFF) % count`` that aiokafka's ``DefaultPartitioner`` (and the
    Java client) gives a keyed record, so a record sent with it lands where ``send`` without a
    partition would put it. The cache is dropped whole when it fills."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: dict[str, int] = dict(counts or {})
        self.cache: dict[tuple[int, bytes], int] = {}

    def __call__(self, topic: str, key: bytes) -> int:
        count = self.counts[topic]
        cached = self.cache.get((count, key))
        if cached is None:
            if len(self.cache) >= PARTITION_CACHE_SIZE:
                self.cache.clear()
            cached = self.cache[(count, key)] = (murmur2(key) & 0x7FFFFFFF) % count
        return cached
