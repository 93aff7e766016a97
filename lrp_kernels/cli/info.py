"""``lrp-kernels info``: versions, backends (and why not), devices."""
from __future__ import annotations

import argparse
import json
import platform


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="versions, available backends and why, devices",
                       description="Print versions, the state of each backend (and why it is or is "
                                   "not available here) and the visible devices.")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def collect() -> dict:
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
    return {"versions": versions, "backends": lrp_kernels.available_backends(), "devices": devices,
            "selected_backend": lrp_kernels.current_backend()}


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    for k, v in info["versions"].items():
        print(f"{k:<14} {v}")
    print(f"selected       {info['selected_backend']} (LRP_KERNELS_BACKEND / use_backend)")
    print("backends:")
    for name, st in info["backends"].items():
        print(f"  {name:<7} {'yes' if st['available'] else 'no ':<4} {st['reason']}")
    print("devices:       " + ", ".join(info["devices"]))
    return 0
