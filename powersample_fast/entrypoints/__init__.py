"""Where requests enter: the CLI, the OpenAI-compatible server, the JSONL batch runner, the paper drop-in."""
