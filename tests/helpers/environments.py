"""What some tests need from outside the test environment, fetched once and cached.

- :func:`peer_source` — a peer library's source distribution (``lxt==2.1``, ``zennit==0.5.1``),
  downloaded from the package registry and unpacked. Their own test suites judge our compat
  layers; nothing of theirs is committed to this repository.
- :func:`vision_python` — the interpreter of a second virtual environment with torch 2.14.1,
  torchvision 0.29.1 and open_clip_torch (torchvision does not import beside the torch 2.13 CPU
  wheel of the main test environment), with this project installed editable. Built on first use
  (about a minute from the machine's disk plus the registry, ~6 GB), then reused.

Both live under ``$LRP_KERNELS_CACHE`` (default ``~/.cache/lrp_kernels``). A file lock keeps
parallel test processes from building the same thing twice; a stamp file marks a finished build,
so an interrupted one is redone. ``LRP_KERNELS_NO_VISION_ENV=1`` turns the second environment off
(its tests then skip, saying why).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

VISION_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1", "open_clip_torch")


def cache_dir() -> Path:
    root = Path(os.environ.get("LRP_KERNELS_CACHE", Path.home() / ".cache" / "lrp_kernels"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip(python: str | Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def peer_source(name: str, version: str) -> Path:
    """The unpacked source distribution of ``name==version`` (its top folder, with ``tests/``).

    Raises ``RuntimeError`` (with pip's last words) when the registry cannot be reached.
    """
    target = cache_dir() / "peers" / f"{name}-{version}"
    stamp = target / ".complete"
    with _locked(target):
        if stamp.exists():
            return next(p for p in target.iterdir() if p.is_dir())
        shutil.rmtree(target, ignore_errors=True)
        download = target / "download"
        done = _pip(sys.executable, "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(download), f"{name}=={version}", timeout=300)
        archives = sorted(download.glob("*.tar.gz")) if download.exists() else []
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the {name}=={version} sdist: {done.stderr.strip()[-500:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(target, filter="data")
        shutil.rmtree(download)
        stamp.touch()
        return next(p for p in target.iterdir() if p.is_dir())


def _vision_env_dir() -> Path:
    key = hashlib.sha256(" ".join(VISION_REQUIREMENTS).encode()).hexdigest()[:10]
    return cache_dir() / "envs" / f"vision-py{sys.version_info.major}{sys.version_info.minor}-{key}"


def vision_python() -> Path:
    """The python of the cached vision environment, built on first use.

    The project is installed editable from this checkout, so the environment follows the code
    under test. Raises ``RuntimeError`` naming the step that failed (tests turn that into a skip
    only when ``LRP_KERNELS_NO_VISION_ENV`` is set; otherwise a broken environment fails).
    """
    if os.environ.get("LRP_KERNELS_NO_VISION_ENV"):
        raise RuntimeError("LRP_KERNELS_NO_VISION_ENV is set")
    env_dir = _vision_env_dir()
    python = env_dir / "bin" / "python"
    stamp = env_dir / ".complete"
    with _locked(env_dir):
        if stamp.exists() and stamp.read_text() == str(REPO_ROOT) and python.exists():
            return python
        if not stamp.exists():
            shutil.rmtree(env_dir, ignore_errors=True)
            made = subprocess.run([sys.executable, "-m", "venv", str(env_dir)], capture_output=True, text=True)
            if made.returncode != 0:
                raise RuntimeError(f"python -m venv failed: {made.stderr.strip()[-500:]}")
            done = _pip(python, "install", "-q", *VISION_REQUIREMENTS, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(VISION_REQUIREMENTS)} failed: {done.stderr.strip()[-800:]}")
        # (re)point the editable install at this checkout: cheap, and a moved clone keeps working
        done = _pip(python, "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(REPO_ROOT), timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pip install -e {REPO_ROOT} failed: {done.stderr.strip()[-800:]}")
        done = _pip(python, "install", "-q", "pytest>=8", "hypothesis>=6.100", "transformers>=5.0,<6",
                    "safetensors>=0.4", "tokenizers>=0.20", "ninja>=1.11", "pybind11>=2.12", "tqdm>=4.60",
                    "numpy>=1.24", "matplotlib>=3.7", "pillow", "click", timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"installing the test dependencies failed: {done.stderr.strip()[-800:]}")
        stamp.write_text(str(REPO_ROOT))
        return python
