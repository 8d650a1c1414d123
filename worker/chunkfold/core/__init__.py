"""The pure accumulation engine: no Kafka, no Faust, no asyncio (a test enforces it)."""
