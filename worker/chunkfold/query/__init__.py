"""The query listener: live completion snapshots and event resume.

``server.py`` serves ``GET /completions/{id}`` and ``GET /completions/{id}/events`` on
``CHUNKFOLD_QUERY_HOST``:``CHUNKFOLD_QUERY_PORT`` (off by default, separate from the metrics
listener); ``owners.py`` tells which member owns a completion's partition, from the consumer
group's membership (``membership.py``, the direct driver's partition assignor); ``resume.py``
reads a completion's published events back from the events topic.
"""
