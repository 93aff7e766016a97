"""The documentation site builds strictly (no broken link, anchor or cross-reference, no
docstring warning) and its API reference covers the public modules.

The docs packages (mkdocs, mkdocs-material, mkdocstrings[python]) are in the ``test`` extra, so
this test runs in CI; it is not skipped when they are missing, it fails and says what to install.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"

# every public module has a reference page (mkdocstrings ``::: target``)
PUBLIC_MODULES = {
    "lrp_kernels.ops.functional", "lrp_kernels.ops.grad", "lrp_kernels.ops.modules",
    "lrp_kernels.ops.attention", "lrp_kernels.backends.dispatch", "lrp_kernels.explicit.rules",
    "lrp_kernels.explicit.composite", "lrp_kernels.explicit.fx", "lrp_kernels.hooks.core",
    "lrp_kernels.hooks.rules", "lrp_kernels.hooks.composites", "lrp_kernels.hf.patching",
    "lrp_kernels.hf.families", "lrp_kernels.hf.latent", "lrp_kernels.explanations.api",
    "lrp_kernels.explanations.heatmap", "lrp_kernels.explanations.imaging",
    "lrp_kernels.explanations.sources", "lrp_kernels.explanations.viewer",
    "lrp_kernels.explanations.matrix", "lrp_kernels.compat.captum",
    "lrp_kernels.explanations.image", "lrp_kernels.explanations.batch",
    "lrp_kernels.ops.multihead", "lrp_kernels.hooks.attention", "lrp_kernels.explicit.openclip",
    "lrp_kernels.tools.check", "lrp_kernels.tools.compare", "lrp_kernels.tools.profile",
    "lrp_kernels.tools.faithfulness",
}

TARGET = re.compile(r"^:::\s+(\S+)", re.MULTILINE)


def reference_targets() -> dict[str, Path]:
    """``::: target`` -> the page that documents it, for every page under docs/reference."""
    found = {}
    for page in sorted(REFERENCE.rglob("*.md")):
        for target in TARGET.findall(page.read_text(encoding="utf-8")):
            found[target] = page
    return found


def _resolve(target: str):
    """Import ``target`` as a module, or as an attribute of the module that defines it."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError:
        module, _, attr = target.rpartition(".")
        return getattr(importlib.import_module(module), attr)


def test_reference_targets_import():
    targets = reference_targets()
    assert targets, "no ::: targets under docs/reference"
    for target, page in targets.items():
        try:
            _resolve(target)
        except Exception as err:  # report the page, not only the import error
            pytest.fail(f"{page.relative_to(ROOT)}: ::: {target} does not import ({type(err).__name__}: {err})")


def test_reference_covers_public_modules():
    missing = PUBLIC_MODULES - set(reference_targets())
    assert not missing, f"public modules without a reference page: {sorted(missing)}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with ``mkdocs build --strict`` into a temporary folder."""
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as err:
        pytest.fail(f"the docs packages are missing ({err}); pip install -e '.[test]' (or '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{log}"
    return out


def _page(site: Path, path: str) -> str:
    html = site / path / "index.html"
    assert html.is_file(), f"page {path}/ was not built"
    return html.read_text(encoding="utf-8")


def test_build_strict_has_the_pages(site):
    for path in ("guides/explain-llm", "guides/long-context", "guides/rules-and-composite",
                 "guides/zennit-style", "guides/verify-new-architecture", "guides/backends", "cli",
                 "reference"):
        _page(site, path)
    assert (site / "index.html").is_file()
    assert "recall-llama" in (site / "index.html").read_text(encoding="utf-8")
    math = _page(site, "math")
    for words in ("stab(z) = z + eps * sgn(z)", "Masked logits", "physical", "rowsum(H * O)"):
        assert words in math, f"math page lacks {words!r}"
    migration = _page(site, "migration")
    for name in ("lxt.efficient.monkey_patch", "zennit.core.BasicHook", "not yet"):
        assert name in migration, f"migration page lacks {name!r}"


def test_reference_renders_the_functions(site):
    # the drop-ins are built at import time: their entries come from the docs extension
    for view in ("functional", "grad"):
        html = _page(site, f"reference/ops/{view}")
        for name in ("linear_epsilon", "softmax", "matmul", "rms_norm_identity"):
            assert f'id="lrp_kernels.ops.{view}.{name}"' in html, f"ops.{view}.{name} has no entry"
    assert 'id="lrp_kernels.hf.patching.patch"' in _page(site, "reference/hf/patching")
    assert 'id="lrp_kernels.tools.check.conservation"' in _page(site, "reference/tools/check")
