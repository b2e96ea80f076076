"""`python -m powersample_fast.cli ...`: the same as the `powersample-fast` console script."""
import sys

from ..entrypoints.cli.main import main

sys.exit(main())
