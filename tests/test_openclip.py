"""Runs the OpenCLIP tests (tests/vision/) in the cached vision environment
(:func:`helpers.environments.vision_python`: torch 2.14.1 + torchvision 0.29.1 + open_clip_torch;
torchvision does not import beside the main environment's torch) and fails unless every one of
them ran and passed: a skip there (open_clip not importable, say) is a failure here.

The subprocess gets ``HF_HUB_OFFLINE=1`` (and the tests refuse every socket connection while the
model is built: nothing is downloaded), this checkout first on ``PYTHONPATH`` (whatever checkout
the environment's editable install points at), and ``LRP_KERNELS_NO_CPP=1`` (no second C++
build for the other torch; the torch backend computes the same rules).
"""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from helpers.environments import REPO_ROOT, vision_python
from helpers.peer_suites import _outcomes, summary

VISION_TESTS = REPO_ROOT / "tests" / "vision"


def _defined_tests() -> set:
    names = set()
    for path in VISION_TESTS.glob("test_*.py"):
        names |= {f"{path.stem}::{n}" for n in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)}
    return names


def test_openclip_suite_passes_in_the_vision_environment(tmp_path):
    try:
        python = vision_python()
    except RuntimeError as err:
        if os.environ.get("LRP_KERNELS_NO_VISION_ENV"):
            pytest.skip(f"the OpenCLIP tests need torchvision: {err}")
        raise
    report = tmp_path / "report.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", LRP_KERNELS_NO_CPP="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    start = time.perf_counter()
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"--junitxml={report}", "--rootdir", str(REPO_ROOT), str(VISION_TESTS)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    output = (done.stdout + done.stderr)[-4000:]
    assert report.exists(), f"the vision tests wrote no report (exit {done.returncode}):\n{output}"
    outcomes = _outcomes(report, output)
    print(f"tests/vision in the vision environment: {summary(outcomes)} in {seconds:.1f} s")
    bad = {k: v for k, v in outcomes.items() if v != "passed"}
    assert not bad and done.returncode == 0, f"not passed (skips count): {bad}\n{output}"
    ran = {f"{k.split('::')[0].rsplit('.', 1)[-1]}::{k.split('::')[1].split('[')[0]}" for k in outcomes}
    missing = _defined_tests() - ran
    assert not missing, f"vision tests that did not run: {sorted(missing)}"
