"""benchmarks/bench_mh_mixing.py (issue 22's mixing measurement) runs its exact part: table, plot and
JSON, with the entropy cut ahead of uniform cuts on its words toy."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # ~3.5 s
def test_mixing_benchmark_runs_exact_part(tmp_path):
    """Exact part only, short: writes its table and plot, and on its words toy the entropy cut is
    ahead of uniform cuts after 8 steps."""
    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mh_mixing.py"
    spec = importlib.util.spec_from_file_location("bench_mh_mixing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--out", str(tmp_path / "mix"), "--taus", "1", "--steps", "8"])
    assert (tmp_path / "mix.png").stat().st_size > 0 and "| entropy + tries 4 |" in (tmp_path / "mix.md").read_text()
    tv = {k: v["tv"] for k, v in json.loads((tmp_path / "mix.json").read_text())["exact"]["1.0"].items()}
    assert tv["entropy"][8] < tv["uniform"][8] and tv["entropy + tries 2"][8] < tv["entropy"][8]
