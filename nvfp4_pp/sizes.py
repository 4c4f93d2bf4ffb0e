"""Sizes the exporter and writer work in, which the planner's memory model counts: one place for both."""

EXPORT_CHUNK_ELEMENTS = 2**25
"""Weight elements packed at once. modelopt's packing holds ~13 bytes per element in temporaries
(fp32 copies, bucket indices); a 28672 x 8192 Linear at once would add 3 GB to the stage's peak."""
DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Small enough that hashing and writing overlap packing; vLLM loads any number of shards."""
WRITE_WORKERS = 2
"""Shard-writer threads: full shards written and checksummed while the next Linears are packed."""
EXPORT_QUEUE_LAYERS = 1
"""Calibrated layers waiting for the export thread besides the one it exports: the caller blocks beyond."""
