"""Where a worker's completion state lives: the ``StateStore`` protocol the processor reads and
writes, and its stores (memory, the direct driver's changelog, Faust's table, the RocksDB local
copy)."""
