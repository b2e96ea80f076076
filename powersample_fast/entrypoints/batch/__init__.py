"""`powersample-fast run`: the JSONL batch runner, its results store, grading and data parallelism."""
