"""Official downloads to verified shard sets: a converter scans (``sources``), the engine writes (``engine``)."""
