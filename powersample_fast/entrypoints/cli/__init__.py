"""`powersample-fast`: the command line (main.py: parser and `sample`; `serve` and `run` add their own)."""
