"""The judge of lrp_kernels.compat.zennit's attribution, image and cmap modules: Zennit 0.5.1's own
``tests/test_attribution.py``, ``tests/test_image.py`` and ``tests/test_cmap.py``, run against the
compat layer.

The ``zennit==0.5.1`` sdist is downloaded once (:func:`helpers.environments.peer_source`); an
import shim made at test time maps ``zennit`` and its submodules to
:mod:`lrp_kernels.compat.zennit` (:func:`helpers.peer_suites.run_peer_suite`). Zennit's conftest
imports torchvision, so the suite runs in the cached vision environment
(:func:`helpers.environments.vision_python`). Every test must pass except the deliberate
differences below (none so far: the differences listed in docs/compat-zennit-attribution.md are
all outside what these tests reach), and each listed one must still fail.

``test_attribution.py`` is large (about 61,000 parametrised tests: every linear layer type x
composite x output function x eight seeds; 35-50 minutes on two busy CPU cores). As for the rule
machinery (tests/compat/test_zennit_suite.py), the judge runs Zennit's two unmarked seeds
(``-m "not extended"``: a quarter of it, every test function still runs); all eight seeds passed
when run once by hand (60,842 of 60,842). ``test_image.py`` and ``test_cmap.py`` (335 tests)
take seconds.
"""
import re

from helpers.peer_suites import judge_run, summary

ATTRIBUTION_IMAGE_CMAP_DIFFERENCES = {}


def _run(files):
    """``(sdist folder, {node id: outcome})`` of Zennit's ``tests/<files>``."""
    return judge_run("zennit", "0.5.1", "lrp_kernels.compat.zennit", vision=True,
                     tests=tuple(f"tests/{f}" for f in files), extra_args=("-m", "not extended"), timeout=3600)


def _judge(source, outcomes, files):
    print(f"Zennit 0.5.1 {', '.join(files)} on lrp_kernels.compat.zennit: {summary(outcomes)}")
    unexpected = {k: v for k, v in outcomes.items()
                  if v != "passed" and k not in ATTRIBUTION_IMAGE_CMAP_DIFFERENCES}
    assert not unexpected, f"Zennit tests failing that are not documented differences: {unexpected}"
    passing = [k for k in ATTRIBUTION_IMAGE_CMAP_DIFFERENCES if outcomes.get(k) == "passed"]
    assert not passing, f"documented differences that pass now (remove them): {passing}"
    # every test function of the files ran (a shim that breaks collection would drop some)
    defined = {name for f in files
               for name in re.findall(r"^\s*def (test_\w+)", (source / "tests" / f).read_text(), re.MULTILINE)}
    ran = {k.split("::")[-1].split("[")[0] for k in outcomes}
    assert defined == ran, f"test functions that did not run: {sorted(defined - ran)}"


def test_zennit_image_and_cmap_suites():
    files = ("test_image.py", "test_cmap.py")
    _judge(*_run(files), files)


def test_zennit_attribution_suite():
    files = ("test_attribution.py",)
    _judge(*_run(files), files)
