"""`python tests/_cli_launch.py ARGS...` = `powersample-fast ARGS...`, with the engine stand-in
installed while the real engine has not landed (see _fake_engine.py)."""
import sys

try:
    import _fake_engine

    _fake_engine.install()
except ImportError:  # the real engine
    pass

from powersample_fast.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
