"""``lrp-kernels info``: versions, backends (and why not), devices.

A diagnostic never stops half-way: a bad ``LRP_KERNELS_BACKEND`` is shown in place of the
selected backend, everything else is printed as usual, then one error line goes to stderr and
the exit code is 2 (so scripts notice the broken setting).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="versions, available backends and why, devices",
                       description="Print versions, the state of each backend (and why it is or is "
                                   "not available here) and the visible devices. An invalid "
                                   "LRP_KERNELS_BACKEND is reported with the rest, then on stderr, "
                                   "with exit code 2.")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def collect() -> dict:
    """Everything ``info`` prints; ``problems`` lists what is misconfigured (empty if nothing)."""
    import torch

    import lrp_kernels

    versions = {"lrp_kernels": lrp_kernels.__version__, "python": platform.python_version(),
                "torch": torch.__version__}
    for mod in ("transformers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as err:  # report, do not fail
            versions[mod] = f"not importable ({type(err).__name__})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    problems = []
    try:
        selected = lrp_kernels.current_backend()
    except ValueError as err:  # LRP_KERNELS_BACKEND names no backend
        selected = None
        problems.append(str(err))
    return {"versions": versions, "backends": lrp_kernels.available_backends(), "devices": devices,
            "selected_backend": selected, "problems": problems}


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info["versions"].items():
            print(f"{k:<14} {v}")
        selected = info["selected_backend"] or "INVALID: " + "; ".join(info["problems"])
        print(f"selected       {selected} (LRP_KERNELS_BACKEND / use_backend)")
        print("backends:")
        for name, st in info["backends"].items():
            print(f"  {name:<7} {'yes' if st['available'] else 'no ':<4} {st['reason']}")
        print("devices:       " + ", ".join(info["devices"]))
    if info["problems"]:
        sys.stdout.flush()
        print(f"lrp-kernels info: error: {'; '.join(info['problems'])}", file=sys.stderr)
        return 2
    return 0
