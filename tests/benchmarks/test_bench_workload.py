"""The MATH500-shaped workload script (benchmarks/bench_workload.py) runs end to end on CPU with a
tiny model, so a GPU session is not spent on a broken script. Its timings are not checked (they
are measurements); its counts and its report are."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # ~2-3 s


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers.tiny_models import make_random_model_dir

    return make_random_model_dir(tmp_path_factory.mktemp("tiny_workload"))


def test_workload_report(tiny_dir, tmp_path):
    import bench_workload as bw

    rep = bw.main(["--model", str(tiny_dir), "--device", "cpu", "--prompts", "3", "--prompt-len", "12",
                   "--budget", "16", "--block-size", "8", "--steps", "2", "--methods", "mh,smc,plain",
                   "--particles", "4", "--profile", "--profile-budget", "8", "--out", str(tmp_path)])
    mh, smc, plain = rep["runs"]
    assert (mh["method"], smc["method"], plain["method"]) == ("mh", "smc", "plain")
    assert plain["tokens_sampled"] == 3 * 16  # EOS off: every chain runs its whole budget
    # MH: the 16 kept tokens plus 2 proposals per block, each from an index in [0, k*8) of block k
    assert 3 * (16 + 2 * 2) <= mh["tokens_sampled"] <= 3 * (16 + 2 * (8 + 16))
    assert smc["tokens_sampled"] == 3 * 4 * 16 and smc["max_batch_rows"] == 12  # 4 particles per prompt
    assert mh["extrapolated_s"] == pytest.approx(mh["wall_s"] * 500 / 3)
    lens = [len(p) for p in bw.make_prompts(64, 150, 1000)]
    assert 130 <= min(lens) < max(lens) <= 170  # ragged, around 150
    prof = rep["profile"]
    assert prof["categories_s"]["linear layers"] > 0 and set(prof["ranges_cpu_s"]) >= {"prefill", "decode"}
    assert 0 < prof["busy_s"] <= prof["wall_s"] * 1.05  # CPU self times of one call: not double counted
    md = next(tmp_path.glob("workload-*.md")).read_text()
    assert "extrapolated to 500 prompts" in md and "| smc |" in md and "## Profile" in md
    assert json.loads(next(tmp_path.glob("workload-*.json")).read_text())["meta"]["prompts"] == 3


def test_unknown_model_is_named(tmp_path):
    import bench_workload as bw

    with pytest.raises(SystemExit, match="neither a shape"):
        bw.main(["--model", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path)])


def test_cuda_breakdown_counts_each_kernel_once():
    """On CUDA torch lists a kernel's time twice (the aten op that launched it and the kernel itself),
    and each engine range twice (host range, GPU annotation with no host time): fake profiler entries
    of both kinds."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    import bench_workload as bw

    def ev(key, dev, self_dev=0.0, cpu_total=0.0, self_cpu=0.0, ann=False):
        return E(key=key, device_type=dev, self_device_time_total=self_dev * 1e6, cpu_time_total=cpu_total * 1e6,
                 self_cpu_time_total=self_cpu * 1e6, is_user_annotation=ann, count=1)

    C, G = DeviceType.CPU, DeviceType.CUDA
    events = [ev("aten::mm", C, self_dev=0.5, self_cpu=0.01), ev("nvjet_tst_128x64_bf16", G, self_dev=0.5),
              ev("gemv2T_kernel_val<int, int, __nv_bfloat16>", G, self_dev=0.1),
              ev("aten::_efficient_attention_forward", C, self_dev=0.2),
              ev("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", G, self_dev=0.2),
              ev("_sample_kernel", G, self_dev=0.05), ev("_kv_copy_kernel", G, self_dev=0.01),
              ev("decode", C, cpu_total=1.2, ann=True), ev("decode", G, self_dev=0.8, ann=True),
              ev("sample", C, cpu_total=0.1, ann=True), ev("sample", G, ann=True)]
    out = bw.breakdown(E(key_averages=lambda: events), 1.5, cuda=True)
    cats = out["categories_s"]
    assert cats["linear layers"] == pytest.approx(0.6) and cats["attention"] == pytest.approx(0.2)
    assert cats["sampling kernel"] == pytest.approx(0.05) and cats["K/V copy (fork)"] == pytest.approx(0.01)
    assert out["busy_s"] == pytest.approx(0.86) and out["host_gaps_s"] == pytest.approx(0.64)
    assert out["ranges_cpu_s"] == pytest.approx({"decode": 1.2, "sample": 0.1})
