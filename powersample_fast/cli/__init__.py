"""`powersample_fast.cli`: the public name of the command line (`python -m powersample_fast.cli`,
`from powersample_fast.cli import main`); the code is in `entrypoints/cli/`."""
from ..entrypoints.cli.main import main

__all__ = ["main"]
