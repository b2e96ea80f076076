"""Packaging and the Makefile: license metadata without setuptools deprecations, the version, and
`make run` / `make sample` passing prompts and arguments through as typed."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import powersample_fast

REPO = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
    assert powersample_fast.__version__ == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_license_is_an_spdx_expression_without_deprecation_warnings(tmp_path):
    """`pip install -e .` used to print four SetuptoolsDeprecationWarning blocks for the license table."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for pkg in ("powersample_fast", "csrc_triton"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "meta").mkdir()
    code = ("import setuptools.build_meta as b, sys; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path / "meta")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "license" not in res.stderr.lower(), res.stderr[-2000:]
    meta = (tmp_path / "meta" / res.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in meta
    req = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "setuptools>=77" in req  # first setuptools with PEP 639 license expressions


def test_wheel_holds_every_subpackage(tmp_path):
    """A non-editable install gets every package directory (engine/, policies/ were left out once) and
    the C++ source cpu_kernels builds."""
    import zipfile

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for pkg in ("powersample_fast", "csrc_triton"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "dist").mkdir()
    code = "import setuptools.build_meta as b, sys; print(b.build_wheel(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    names = set(zipfile.ZipFile(tmp_path / "dist" / res.stdout.strip().splitlines()[-1]).namelist())
    want = {str(p.relative_to(REPO)) for pkg in ("powersample_fast", "csrc_triton") for ext in ("*.py", "*.cpp")
            for p in (REPO / pkg).rglob(ext) if "__pycache__" not in p.parts}  # .cpp: models/csrc, built at run time
    assert want <= names, sorted(want - names)


@pytest.fixture
def fake_venv(tmp_path):
    """A VENV whose python prints its argv as JSON, so a make target's command line can be read back."""
    (tmp_path / "bin").mkdir()
    py = tmp_path / "bin" / "python"
    py.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    py.chmod(0o755)
    (tmp_path / ".installed").touch()
    return tmp_path


def _make(venv, *args):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    res = subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={venv}", "-o", f"{venv}/.installed", *args],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_make_run_passes_the_prompt_as_typed(fake_venv):
    prompt = 'Say "hi" for $5, `x`, $(HOME) and \\n'
    argv = _make(fake_venv, "run", f"PROMPT={prompt}", "EXTRA_ARGS=--alpha 2 --n 3")
    assert argv[argv.index("--prompt") + 1] == prompt
    assert argv[-5:] == ["--alpha", "2", "--n", "3", "--stats"]  # EXTRA_ARGS after the defaults: they win


def test_make_run_default_is_short(fake_venv):
    argv = _make(fake_venv, "run")
    budget = int(argv[argv.index("--max-new-tokens") + 1])
    steps, n = int(argv[argv.index("--steps") + 1]), int(argv[argv.index("--n") + 1])
    assert budget <= 128 and steps <= 2 and n == 1  # 20-30 s on the project's 2-core CPU (README)
    assert "--chat" not in argv and "--no-chat" not in argv  # the chat template applies by default


def test_make_sample_takes_cli_arguments(fake_venv):
    argv = _make(fake_venv, "sample", "ARGS=--prompt 'a b' --n 2 --json")
    assert argv == ["-m", "powersample_fast.cli", "sample", "--prompt", "a b", "--n", "2", "--json"]


def test_readme_says_how_to_reach_the_cli():
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/powersample-fast" in readme and "source .venv/bin/activate" in readme
    assert "make sample ARGS=" in readme


@pytest.mark.parametrize("script", [".ci/run", "benchmarks/gpu_session.sh"])
def test_shell_scripts_parse(script):
    """A syntax error in the GPU session script would cost a GPU call (it had one: an apostrophe
    inside ${2:?...})."""
    r = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_session_script_names_its_modes():
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu_session.sh")], capture_output=True, text=True)
    assert r.returncode != 0 and "tests|e2e|workload OUT" in r.stderr
