"""``lrp-kernels build-ext``: compile the C++ extension now instead of on first use."""
from __future__ import annotations

import argparse
import json
import time

from . import CLIError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build-ext", help="prebuild the C++ kernels (otherwise built on first use)",
        description="Compile the C++ extension (RMSNorm-identity, LayerNorm, the epsilon factor, the "
                    "gated product's backward; the norms' CUDA variant too when torch has CUDA and "
                    "nvcc is found) into the user cache and print where "
                    "it went and how long it took. A build that is up to date only loads.")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..backends import cpp as _cpp

    if _cpp.disabled():
        raise CLIError(f"the C++ backend is disabled by {_cpp.ENV_DISABLE}=1; unset it to build")
    problem = _cpp.toolchain_problem()
    if problem:
        raise CLIError(problem)
    was_built = _cpp.is_built()
    t0 = time.perf_counter()
    try:
        module = _cpp.load_extension(verbose=args.verbose)
    except _cpp.BuildError as err:
        raise CLIError(str(err)) from None
    seconds = time.perf_counter() - t0
    info = {"build_dir": str(_cpp.build_dir()), "built_now": not was_built, "seconds": round(seconds, 2),
            "with_cuda": bool(getattr(module, "with_cuda", False)), "sources": str(_cpp.source_dir())}
    if args.json:
        print(json.dumps(info))
    else:
        what = f"built in {seconds:.1f} s" if info["built_now"] else f"already built, loaded in {seconds:.2f} s"
        print(f"C++ extension ({'CPU + CUDA' if info['with_cuda'] else 'CPU'}) {what}")
        print(f"  location: {info['build_dir']}")
        print(f"  sources:  {info['sources']}")
    return 0
