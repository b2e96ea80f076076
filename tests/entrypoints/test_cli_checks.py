"""CLI: complete JSON output, --version, chat template by default, --threads, and every check that
must fail fast (before the model loads) with one line and exit 2; Ctrl-C during start-up."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from powersample_fast.entrypoints.cli import main as cli, startup as cli_setup
from powersample_fast.models import loader as loader_mod
from powersample_fast.models import tokenizer as tokenizer_mod

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"alpha", "max_new_tokens", "block_size", "mcmc_steps", "proposal_temperature", "top_k", "index", "n",
          "seed"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers.tiny_models import make_cli_model_dir

    return make_cli_model_dir(tmp_path_factory.mktemp("cli_checks"))


@pytest.fixture
def keep_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _run(model_dir, *extra):
    return cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "6",
                     "--block-size", "3", "--steps", "1", "--no-progress", *extra])


def _spy_generate(monkeypatch):
    from powersample_fast import api as smod

    seen = {}

    def fake(self, prompts, **kw):
        seen.update(kw, prompts=prompts, threads=torch.get_num_threads())
        return []

    monkeypatch.setattr(smod.PowerSampler, "generate", fake)
    return seen


def _no_load(monkeypatch):
    def fail(*a, **k):
        pytest.fail("the model was loaded before the error was reported")

    monkeypatch.setattr(loader_mod, "load_model", fail)


def test_json_lines_carry_the_inputs_and_a_resolved_seed(model_dir, capsys, keep_threads):
    assert _run(model_dir, "--json", "--prompt", "abc", "--alpha", "2", "--top-k", "5") == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "abc"]
    for r in rows:
        assert PARAMS <= set(r) and {"model", "model_dir", "chat", "device", "dtype"} <= set(r)
        assert (r["model"], r["alpha"], r["top_k"], r["max_new_tokens"], r["block_size"], r["mcmc_steps"]) == \
            (str(model_dir), 2.0, 5, 6, 3, 1)
        assert r["proposal_temperature"] == 0.5 and r["index"] == "uniform" and r["chat"] is True
    seed = rows[0]["seed"]
    assert isinstance(seed, int) and rows[1]["seed"] == seed  # one seed per call, drawn by the CLI
    assert _run(model_dir, "--json", "--prompt", "abc", "--alpha", "2", "--top-k", "5", "--seed", str(seed)) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in rows]  # the printed seed reproduces


def test_stats_text_on_stderr_without_json(model_dir, capsys, keep_threads):
    assert _run(model_dir, "--stats", "--seed", "0") == 0
    out, err = capsys.readouterr()
    assert out.startswith("--- prompt 0 sample 0:") and "stats: " in err and "acceptance_rate=" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"powersample-fast {version}"


def test_start_line_names_model_method_chains_budget_time(model_dir, capsys, keep_threads):
    assert _run(model_dir, "--n", "2", "--seed", "0") == 0
    from powersample_fast.device import default_dtype

    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("powersample-fast: ")][0]
    dtype = str(default_dtype("cpu")).replace("torch.", "")  # bf16 on AMX CPUs or when forced, else fp32
    for part in (str(model_dir), "power sampling (Metropolis-Hastings, alpha 4", "1 prompt x 2 = 2 chains",
                 "up to 6 new tokens (block 3, 1 MH steps", "chat template on", f"cpu/{dtype}", "expected ~"):
        assert part in line, part


def test_chat_template_by_default(tmp_path, monkeypatch, capsys, keep_threads):
    from helpers.tiny_models import make_cli_model_dir

    with_t = make_cli_model_dir(tmp_path / "t", chat_template="{% for m in messages %}zz{{ m['content'] }}{% endfor %}")
    seen = _spy_generate(monkeypatch)
    assert _run(with_t) == 0 and seen["chat"] is True
    assert _run(with_t, "--no-chat") == 0 and seen["chat"] is False
    assert _run(with_t, "--chat") == 0 and seen["chat"] is True
    without = make_cli_model_dir(tmp_path / "n", chat_template=None)
    assert _run(without) == 0 and seen["chat"] is False
    capsys.readouterr()
    assert _run(without, "--chat") == 2
    assert "no chat template" in capsys.readouterr().err


def test_threads(model_dir, monkeypatch, keep_threads):
    seen = _spy_generate(monkeypatch)
    torch.set_num_threads(2)
    assert _run(model_dir, "--threads", "1") == 0 and seen["threads"] == 1
    monkeypatch.setattr(cli_setup, "usable_cores", lambda: 2)
    monkeypatch.setattr(cli_setup, "others_cpu_use", lambda cpus: 0.9)
    torch.set_num_threads(2)
    assert _run(model_dir) == 0 and seen["threads"] == 1  # default on a busy machine with <= 2 cores
    monkeypatch.setattr(cli_setup, "others_cpu_use", lambda cpus: 0.05)
    torch.set_num_threads(2)
    assert _run(model_dir) == 0 and seen["threads"] == 2  # idle: torch's default kept
    assert cli_setup.default_threads(cores=2, others=0.5) == 1
    assert cli_setup.default_threads(cores=2, others=0.2) is None
    assert cli_setup.default_threads(cores=16, others=8.0) is None


def test_others_cpu_use_sees_a_busy_process():
    """/proc/stat deltas: a spinning child process shows as about one core of other use."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this OS (the default then keeps torch's threads)")
    cpus = sorted(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = cli_setup.others_cpu_use(cpus, window=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 0.6 <= busy <= len(cpus) + 0.01, busy


@pytest.mark.parametrize("args,match", [
    (["--alpha", "0"], "alpha must be"),
    (["--block-size", "0"], "block_size must be"),
    (["--max-new-tokens", "128"], "leaves no room for a prompt in the model's context of 128"),
    (["--max-new-tokens", "126", "--prompt", "abc"], "prompt 1 has 3 tokens; with --max-new-tokens 126"),
    (["--threads", "0"], "--threads must be"),
    (["--max-batch", "0"], "--max-batch must be"),
])
def test_value_errors_before_the_model_loads(model_dir, monkeypatch, capsys, args, match):
    _no_load(monkeypatch)
    assert _run(model_dir, *args) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_sampling_params_checked_before_the_default_model_is_built(monkeypatch, capsys):
    from powersample_fast.models import default_model as hub

    monkeypatch.setattr(hub, "default_model_dir", lambda *a, **k: pytest.fail("default model resolved first"))
    assert cli.main(["sample", "--prompt", "hi", "--alpha", "-1"]) == 2
    assert "alpha must be" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing_dir", "is_dir"])
def test_profile_path_checked_before_sampling(model_dir, tmp_path, monkeypatch, capsys, where):
    _no_load(monkeypatch)
    path = tmp_path / "no" / "such" / "t.json" if where == "missing_dir" else tmp_path
    assert _run(model_dir, "--profile", str(path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--profile" in err and "written" not in err


def test_triton_backend_on_cpu_points_to_torch(model_dir, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _no_load(monkeypatch)
    assert _run(model_dir, "--backend", "triton", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "use --backend torch" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "run"])
def test_backend_flag_on_serve_and_run(model_dir, tmp_path, monkeypatch, capsys, keep_threads, command):
    """serve and run take --backend as sample does: triton on a CPU is one line and exit 2, before
    the model loads; torch is set for the process."""
    from powersample_fast import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def fail(*a, **k):
        pytest.fail("the model was loaded before the error was reported")

    monkeypatch.setattr(loader_mod, "load", fail)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "hi"}\n')
    args = {"serve": ["serve", "--model", str(model_dir), "--port", "8999"],
            "run": ["run", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                    "--max-new-tokens", "4", "--block-size", "2", "--steps", "1", "--no-progress"]}[command]
    assert cli.main([*args, "--backend", "triton", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "use --backend torch" in err and len(err.strip().splitlines()) == 1, err
    seen = []
    monkeypatch.setattr(ops, "set_backend", seen.append)
    with pytest.raises(pytest.fail.Exception, match="loaded"):
        cli.main([*args, "--backend", "torch", "--device", "cpu"])
    assert seen == ["torch"]


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, powersample_fast.cli, powersample_fast; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_ctrl_c_while_importing_is_one_line(model_dir, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def interrupt_torch(name, *a, **k):
        if name == "torch":
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", interrupt_torch)
    rc = _run(model_dir)
    monkeypatch.setattr(builtins, "__import__", real)
    assert rc == 130 and capsys.readouterr().err == "powersample-fast: interrupted\n"


def test_sigint_during_startup_subprocess(model_dir):
    """As the console script runs it (`from powersample_fast.cli import main; sys.exit(main())`): SIGINT
    while torch is importing (its library just mapped into the process) gives one line and exit 130."""
    code = "import sys; from powersample_fast.cli import main; sys.exit(main())"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, "sample", "--model", str(model_dir), "--prompt", "hi",
                             "--max-new-tokens", "6", "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        proc.kill()
        pytest.skip("needs /proc to see when torch starts loading")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "powersample-fast: interrupted\n", err


def test_triton_from_the_environment_on_cpu(model_dir, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", "triton")
    _no_load(monkeypatch)
    assert _run(model_dir, "--backend", "auto", "--device", "cpu") == 2
    assert "POWERSAMPLE_FAST_BACKEND=triton runs Triton kernels on CUDA" in capsys.readouterr().err


def test_ctrl_c_turned_into_a_library_error_is_still_an_interrupt(model_dir, monkeypatch, capsys):
    """transformers' lazy imports turn a KeyboardInterrupt into "Could not import module ..."; we
    wrap that as a ModelLoadError. The CLI remembers the Ctrl-C and reports an interrupt anyway."""
    from powersample_fast.errors import ModelLoadError

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("the test runner replaced Python's SIGINT handler")

    def swallowing(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here
        except KeyboardInterrupt:
            raise ModelLoadError("cannot load the tokenizer: Could not import module 'LlamaConfig'") from None
        pytest.fail("SIGINT was not delivered")

    monkeypatch.setattr(tokenizer_mod, "load_tokenizer", swallowing)
    assert _run(model_dir) == 130
    assert capsys.readouterr().err == "powersample-fast: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_start_line_names_each_method_with_its_own_temperature():
    # smc proposes at tau (1/alpha by default); sps/sps_token sample candidates and rollouts from p at
    # temperature 1, so the line must not call them "temperature 1/alpha sampling"
    from powersample_fast.entrypoints.cli.output import announce
    from powersample_fast.sampling_params import SamplingParams

    def line(**kw):
        return announce("m", SamplingParams(max_new_tokens=8, **kw), 1, False, "cpu", "float32", 1, 8, 0.01)

    assert "Power-SMC (alpha 4, 64 particles, tau 0.25)" in line(method="smc")
    sps = line(method="sps")
    assert "block level" in sps and "64 candidates" in sps and "top 8 x 8 rollouts" in sps and "tau" not in sps
    assert "token level" in line(method="sps_token") and "temperature" not in line(method="sps_token")
    assert "plain sampling (temperature 1)" in line(method="plain")
