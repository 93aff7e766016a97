#!/usr/bin/env python
"""How far can an AttnLRP explanation go in context length on this machine, and at what cost?

Profiles one explanation (forward + backward of the top next-token logit, relevance =
``inputs_embeds * inputs_embeds.grad``) at growing sequence lengths with
:func:`lrp_kernels.tools.profile.profile`, next to a plain forward + input-gradient pass of the same
model, and plots time and peak memory against length (``--plot``, needs matplotlib)::

    PYTHONPATH=. python python/profile_long_context.py --model llama-tiny --seq 256,512,1024 --plot out.png
    PYTHONPATH=. python python/profile_long_context.py --model llama-3-8b-shape --device cuda \\
        --seq 8192,16384,32768 --checkpointing

Stops early (and says so) at the first length that runs out of memory.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-tiny", help="local model dir or llama-tiny / llama-long-bench / llama-3-8b-shape")
    p.add_argument("--seq", default="256,512,1024", help="comma-separated lengths, increasing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--plot", default=None, help="write a PNG of time and memory vs length")
    p.add_argument("--json", default=None, help="write the rows as JSON lines to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lrp_kernels.tools.profile import build_model, format_table, profile

    args = parse(argv)
    lens = [int(s) for s in args.seq.split(",")]
    model = build_model(args.model, device=args.device, max_len=max(lens))
    rows = []
    for n in lens:
        try:
            rows += profile(model, [n], checkpointing=args.checkpointing, progress=False,
                            warmup=16 if not rows else 0)
        except torch.OutOfMemoryError:
            print(f"out of memory at {n} tokens: stopping", file=sys.stderr)
            break
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.plot and rows:
        plot(rows, args.plot, f"{args.model} on {rows[0]['device']}")
        print(f"wrote {args.plot}")
    return 0


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode, style in (("plain", "o--"), ("lrp", "s-")):
        rs = [r for r in rows if r["mode"] == mode]
        xs = [r["seq"] for r in rs]
        ax_t.plot(xs, [r["total_s"] for r in rs], style, label=mode)
        ax_m.plot(xs, [r["peak_bytes"] / 2**20 for r in rs], style, label=mode)
    ax_t.set(xlabel="tokens", ylabel="forward + backward (s)", xscale="log")
    ax_m.set(xlabel="tokens", ylabel="peak memory (MiB)", xscale="log")
    ax_t.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
