"""The two ways to run the ``Processor`` on Kafka, with the same topics, group and state
changelog: ``direct`` (batches on aiokafka, the default) and ``faust`` (a Faust agent and
table, the optional extra ``chunkfold[faust]``). What both set alike is named here once."""

PRODUCER_LINGER_MS = 2
"""How long a producer waits to fill a batch (both drivers' producers)."""
