"""Whole-model benchmark: AttnLRP on a Llama-shaped model vs the plain passes it replaces.

Model: random Llama config, hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408,
vocab 32000; logits only for the explained (last) position (``logits_to_keep=1``).
Cases, each in a fresh subprocess (so peak RSS is the case's own), CPU float32:

  (a) forward      plain forward (SDPA attention), no grad
  (b) grad         forward + gradient w.r.t. the input embeddings, parameters frozen
  (c) attnlrp      lrp_kernels.patch(model) + the same forward/backward (relevance = x * x.grad)
  (d) lxt          LXT's efficient AttnLRP, if ``lxt`` is installed (else skipped)

Time: median of ``--repeats`` runs after one warm-up. Memory: peak RSS of the subprocess
(``ru_maxrss``; model weights included, equal in every case). ``cpu_s`` (process CPU time) is
reported next to wall time: it is the steadier number on a shared machine. Goal: (c) <= 1.15x the time of
(b) and <= 1.10x its peak memory. Prints a table, then one JSON line per case.

    PYTHONPATH=. python benchmarks/bench_models.py --quick        # seq 128, 256; ~1 min
    PYTHONPATH=. python benchmarks/bench_models.py                # seq 512, 2048, 4096
    PYTHONPATH=. python benchmarks/bench_models.py --device cuda --dtype bfloat16 --threads 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GOAL_TIME, GOAL_MEMORY = 1.15, 1.10
MODES = ("forward", "grad", "attnlrp", "lxt")


def _build(device: str, dtype):
    import torch
    import transformers as tr
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192)
    return tr.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def _peak_bytes(device: str) -> int:
    import resource

    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_case(mode: str, seq: int, repeats: int, device: str, dtype_name: str, threads: int) -> dict:
    """One case in this process; returns its measurements."""
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    # same numeric settings in every case: flush subnormals (tiny gradients of a random model
    # must not hit the CPU's slow denormal path in one mode and not the other)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, dtype_name)
    model = _build(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    handle = None
    if mode == "attnlrp":
        import lrp_kernels
        handle = lrp_kernels.patch(model)
    elif mode == "lxt":
        try:  # LXT 2.x efficient AttnLRP: patches transformers' modeling module (class level)
            from lxt.efficient import monkey_patch
        except Exception as e:  # not installed: reported as skipped
            return {"skipped": f"lxt not importable ({type(e).__name__})"}
        from transformers.models.llama import modeling_llama
        monkey_patch(modeling_llama, verbose=False)
        model = _build(device, dtype)  # rebuild on the patched classes
        for p in model.parameters():
            p.requires_grad_(False)

    def step():
        emb = model.get_input_embeddings()(ids)
        if mode == "forward":
            with torch.no_grad():
                model(inputs_embeds=emb, use_cache=False, logits_to_keep=1)
            return
        emb = emb.detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits
        logits[0, -1].max().backward()
        (emb * emb.grad).sum(-1)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (also builds any extension / kernel cache)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # cpu_s (process CPU time) is the steadier number on a shared machine
    out = {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_bytes": _peak_bytes(device)}
    if handle is not None:
        handle.remove()
    return out


def _subprocess_case(mode, seq, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", mode, "--seq", str(seq), "--repeats", str(args.repeats),
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seq 128,256 and 2 repeats")
    ap.add_argument("--seq", default=None, help="comma-separated sequence lengths (default 512,2048,4096)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3

    if args.case:
        print(json.dumps(run_case(args.case, int(args.seq), args.repeats, args.device, args.dtype, args.threads)))
        return 0

    seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([128, 256] if args.quick else [512, 2048, 4096])
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    rows = []
    for seq in seqs:
        results = {m: _subprocess_case(m, seq, args) for m in modes}
        base = results.get("grad", {})
        for m in modes:
            r = {"bench": "models", "model": "llama-h512-l8", "device": args.device, "dtype": args.dtype,
                 "threads": args.threads, "seq": seq, "mode": m, **results[m]}
            if "time_s" in r and "time_s" in base:
                r["time_ratio_vs_grad"] = r["time_s"] / base["time_s"]
                r["cpu_ratio_vs_grad"] = r["cpu_s"] / base["cpu_s"]
                r["memory_ratio_vs_grad"] = r["peak_bytes"] / base["peak_bytes"]
                if m == "attnlrp":
                    r["meets_time_goal"] = r["time_ratio_vs_grad"] <= GOAL_TIME
                    r["meets_memory_goal"] = r["memory_ratio_vs_grad"] <= GOAL_MEMORY
            rows.append(r)

    print(f"Llama h512 x 8 layers, {args.device} {args.dtype}, {args.threads} threads; goal: attnlrp <= "
          f"{GOAL_TIME}x time, <= {GOAL_MEMORY}x peak memory of 'grad' (forward + input gradient)")
    print(f"{'seq':>6} {'mode':>8} {'time s':>9} {'cpu s':>9} {'peak MiB':>9} {'t/grad':>7} {'cpu/grad':>8} {'mem/grad':>8}")
    nan = float("nan")
    for r in rows:
        if "time_s" in r:
            print(f"{r['seq']:>6} {r['mode']:>8} {r['time_s']:>9.3f} {r['cpu_s']:>9.3f} {r['peak_bytes'] / 2**20:>9.0f} "
                  f"{r.get('time_ratio_vs_grad', nan):>7.2f} {r.get('cpu_ratio_vs_grad', nan):>8.2f} "
                  f"{r.get('memory_ratio_vs_grad', nan):>8.2f}")
        else:
            print(f"{r['seq']:>6} {r['mode']:>8}  {r.get('skipped') or r.get('error')}")
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
