"""``lrp-kernels batch`` as real processes: killed mid-run (SIGKILL, SIGTERM) and resumed, and
data-parallel under ``accelerate launch`` with 2 CPU processes (gloo); each output must equal
an uninterrupted one-process run byte for byte (same batch plan, one thread everywhere).
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lrp_kernels.cli import main
from lrp_kernels.explanations.batch import explain_dataset

from helpers.batch_records import mixed_records, write_jsonl
from helpers.shipped import load_shipped

OPTS = dict(max_tokens=64, max_batch_size=2)   # many small batches: a kill lands mid-run
CLI_OPTS = ["--max-tokens", "64", "--max-batch-size", "2"]
N = 48


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process output (1 thread, as the subprocesses below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_shipped()
        folder = tmp_path_factory.mktemp("batch-ref")
        data = write_jsonl(folder / "in.jsonl", mixed_records(N, seed=5))
        explain_dataset(model, tok, data, folder / "out.jsonl", progress=False, **OPTS)
    finally:
        torch.set_num_threads(before)
    return data, (folder / "out.jsonl").read_bytes()


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def start_cli(data, out):
    return subprocess.Popen([sys.executable, "-m", "lrp_kernels.cli", "batch", data, "--out",
                             str(out), "--quiet", "--device", "cpu", *CLI_OPTS],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(proc, out, n=1, timeout=300):
    """Block until ``out`` holds ``n`` complete lines (the first batch is durable)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was interrupted: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no batch was written in time")


def rerun(data, out, capsys):
    with_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["batch", data, "--out", str(out), "--quiet", *CLI_OPTS])
    finally:
        torch.set_num_threads(with_threads)
    return code, capsys.readouterr()


@pytest.mark.slow  # a fresh process per case: ~10 s each on a quiet machine
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_uninterrupted_output(sig, reference, tmp_path, capsys):
    data, want = reference
    out = tmp_path / "out.jsonl"
    proc = start_cli(data, out)
    wait_for_lines(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    kept = out.read_bytes()
    assert 0 < kept.count(b"\n") < N, "not interrupted mid-run"
    if sig == signal.SIGTERM:  # graceful: exit 130 after the batch in flight, whole lines only
        assert proc.returncode == 130 and b"interrupted" in err
        assert kept.endswith(b"\n")
    code, cap = rerun(data, out, capsys)
    done = kept[:kept.rfind(b"\n") + 1].count(b"\n")
    assert code == 0 and f"{done} already in" in cap.out
    assert out.read_bytes() == want


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the launcher and two workers start: ~25 s on a quiet machine
def test_accelerate_two_processes_equal_one_and_resume(reference, tmp_path):
    """2 ranks on gloo, started with a third of the output already written (resuming)."""
    pytest.importorskip("accelerate")
    data, want = reference
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(want.splitlines(keepends=True)[:N // 3]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "lrp_kernels.cli", "batch", data,
           "--out", str(out), "--quiet", "--device", "cpu", *CLI_OPTS]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: explained" in proc.stdout and "rank 1 of 2: explained" in proc.stdout
    assert f"wrote {out} ({N} explanations)" in proc.stdout
    assert out.read_bytes() == want
    assert not [p for p in os.listdir(tmp_path) if ".part." in p]
