"""``chunkfold audit-sink``: every ``completion-done`` record stored in a database, exactly once.

* :mod:`chunkfold.audit.database`: connections and the SQLite / PostgreSQL adapters;
* :mod:`chunkfold.audit.store`: the schema, its migrations and the one-transaction batch write;
* :mod:`chunkfold.audit.sink`: the Kafka consumer loop and its entry ``run``.

Each layer calls only the ones above it; the command line is :mod:`chunkfold.cli.audit_sink`.
"""
