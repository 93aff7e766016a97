"""Smoke test: python/composite_example.py runs and prints what it promises."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_composite_example_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "composite_example.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for word in ("EpsilonRule", "IdentityRule", "wrapped", "no violation", "drop-ins give the same relevance: True",
                 "lrp_kernels_ops_functional_softmax", "handled", "ok"):
        assert word in out, (word, out)
