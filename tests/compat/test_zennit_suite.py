"""The judge of lrp_kernels.compat.zennit's rule machinery (core, rules, composites, canonizers,
types, layer, torchvision): Zennit 0.5.1's own test files, run against the compat layer.

The ``zennit==0.5.1`` sdist is downloaded once (:func:`helpers.environments.peer_source`); an
import shim made at test time maps ``zennit`` and its submodules to
:mod:`lrp_kernels.compat.zennit` (:func:`helpers.peer_suites.run_peer_suite`); nothing of Zennit
is committed here. Zennit's conftest imports torchvision, so the suite runs in the cached vision
environment (:func:`helpers.environments.vision_python`). The files below run in one pytest
process; each gets a test of its own here (readable failures), which asserts that every Zennit
test of the file passes except the deliberate differences listed for it, that each listed one
still fails, and that every test function of the file ran.

Zennit's conftest draws its data from eight seeds, six of them marked ``extended``; the judge
runs the two unmarked ones (``-m "not extended"``: about 6,000 tests, ~2 minutes of CPU time;
all eight seeds, ~23,400 tests, took 6 minutes of CPU and pass too). attribution, image and
cmap are judged in test_zennit_attribution_suite.py.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Dict

import pytest

from helpers.peer_suites import judge_run, summary

#: Zennit test node id (or fnmatch pattern) -> why our compat layer deliberately differs. None:
#: every difference of the compat layer (docs/compat-zennit.md) is outside what the tests reach.
CORE_DIFFERENCES: Dict[str, str] = {}

#: the Zennit test files this judge owns, each with its own list of differences
FILES: Dict[str, Dict[str, str]] = {
    "test_core.py": CORE_DIFFERENCES,
    "test_rules.py": CORE_DIFFERENCES,
    "test_composites.py": CORE_DIFFERENCES,
    "test_canonizers.py": CORE_DIFFERENCES,
    "test_torchvision.py": CORE_DIFFERENCES,
}


@pytest.fixture(scope="module")
def suite():
    """``(sdist folder, {node id: outcome})`` of Zennit's test files in :data:`FILES`."""
    source, outcomes = judge_run("zennit", "0.5.1", "lrp_kernels.compat.zennit", vision=True,
                                 tests=tuple(f"tests/{f}" for f in FILES), extra_args=("-m", "not extended"),
                                 timeout=1800)
    print(f"Zennit 0.5.1 {', '.join(FILES)} on lrp_kernels.compat.zennit: {summary(outcomes)}")
    return source, outcomes


def _matches(node: str, key: str) -> bool:
    # exact ids first: their "[...]" parameters would read as character classes to fnmatch
    return node == key or fnmatch.fnmatchcase(node, key)


@pytest.mark.parametrize("file", list(FILES))
def test_zennit_file_passes_except_documented_differences(suite, file):
    source, outcomes = suite
    differences = FILES[file]
    prefix = f"tests.{file[:-3]}::"
    mine = {k: v for k, v in outcomes.items() if k.startswith(prefix)}
    print(f"{file}: {summary(mine) if mine else 'no tests'}")

    # every test function of the file ran (a shim that breaks collection would drop some)
    defined = set(re.findall(r"^def (test_\w+)", (source / "tests" / file).read_text(), re.MULTILINE))
    ran = {k[len(prefix):].split("[")[0] for k in mine}
    assert defined == ran, f"{file}: test functions that did not run: {sorted(defined - ran)}"

    listed = {key: [k for k in mine if _matches(k, key)] for key in differences}
    unexpected = {k: v for k, v in mine.items() if v != "passed" and not any(k in ks for ks in listed.values())}
    assert not unexpected, f"{file}: failing Zennit tests that are not documented differences: {unexpected}"
    still_passing = [key for key, ks in listed.items() if any(mine[k] == "passed" for k in ks)]
    assert not still_passing, f"{file}: documented differences that pass now (remove them): {still_passing}"


def test_documented_differences_name_existing_tests(suite):
    _, outcomes = suite
    stale = [key for key in CORE_DIFFERENCES if not any(_matches(k, key) for k in outcomes)]
    assert not stale, f"documented differences that match no Zennit test (remove them): {stale}"
