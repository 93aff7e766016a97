"""Griffe extension: read the package's reST-flavoured docstrings as Markdown.

The docstrings of ``lrp_kernels`` are written to be read in the source (Google-style
``Args:`` / ``Returns:`` sections, reST roles, simple tables and ``::`` literal blocks). The
mkdocstrings Python handler renders docstrings as Markdown, so three reST constructs are
translated before rendering; the source files are never changed:

* roles such as ``:class:`~lrp_kernels.hooks.core.Hook``` become code that links to the
  object's reference entry when it has one (an *optional* cross-reference: a target that is
  not documented, e.g. a private helper, stays plain code and is not an error);
* simple tables (columns under ``=====  =====`` rules) become Markdown pipe tables;
* the literal-block marker ``::`` at the end of a paragraph becomes ``:`` (the indented block
  after it is already a Markdown code block).

It also fills in the two modules whose functions are built at import time
(:mod:`lrp_kernels.ops.functional` and :mod:`lrp_kernels.ops.grad`, made from one definition
by ``lrp_kernels.ops._views``): static analysis sees no functions there, so they are inspected
from the imported module and added, with their signatures and docstrings.

Enabled in ``mkdocs.yml`` under the python handler's ``extensions``.
"""
from __future__ import annotations

import html
import importlib
import re
import sys
from typing import Any, Optional

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>mod|class|func|meth|attr|data|exc|obj|const):`(?P<target>[^`]+)`")
BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")

# short public names -> the module that defines them
ALIASES = {
    "lrp_kernels.functional": "lrp_kernels.ops.functional",
    "lrp_kernels.grad": "lrp_kernels.ops.grad",
    "lrp_kernels.modules": "lrp_kernels.ops.modules",
    "lrp_kernels.rules": "lrp_kernels.explicit.rules",
    "lrp_kernels.check": "lrp_kernels.tools.check",
    "lrp_kernels.latent": "lrp_kernels.hf.latent",
    "lrp_kernels.patch": "lrp_kernels.hf.patching.patch",
    "lrp_kernels.explain": "lrp_kernels.explanations.api.explain",
    "lrp_kernels.Composite": "lrp_kernels.explicit.composite.Composite",
}


def _absolute(name: str) -> str:
    for short, full in ALIASES.items():
        if name == short or name.startswith(short + "."):
            return full + name[len(short):]
    return name


def _scopes(obj: griffe.Object) -> list[str]:
    """Paths a relative name may be relative to: the enclosing class (if any), then the module."""
    scopes = []
    node: Optional[griffe.Object] = obj
    while node is not None and not node.is_module:
        if node.is_class:
            scopes.append(node.path)
            break
        node = node.parent
    scopes.append(obj.module.path if not obj.is_module else obj.path)
    return scopes


def _role(match: re.Match, obj: griffe.Object) -> str:
    target = match["target"].strip()
    title = None
    explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", target)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    short = target.startswith("~")
    target = target.lstrip("~.")
    if title is None:
        title = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("lrp_kernels"):
        candidates = [_absolute(target)]
    else:
        candidates = [f"{scope}.{target}" for scope in _scopes(obj)] + [target]
    identifier, fallback = candidates[0], candidates[1] if len(candidates) > 1 else None
    attrs = f'identifier="{html.escape(identifier)}"'
    if fallback:
        attrs += f' slug="{html.escape(fallback)}"'
    return f"<autoref {attrs} optional><code>{html.escape(title)}</code></autoref>"


def _columns(border: str) -> list[int]:
    return [m.start() for m in re.finditer(r"=+", border)]


def _cells(line: str, starts: list[int]) -> list[str]:
    bounds = starts[1:] + [None]
    return [line[s:e].strip() if s < len(line) else "" for s, e in zip(starts, bounds)]


def _pipe(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        starts = _columns(lines[i])
        borders, rows, j = 1, [], i + 1
        header_rows = None
        while j < len(lines) and borders < 3:
            line = lines[j]
            if BORDER.match(line):
                borders += 1
                if borders == 2:
                    header_rows = len(rows)
                j += 1
                if borders == 2 and (j >= len(lines) or not lines[j].strip()):
                    break  # a table without header: top and bottom rule only
                continue
            if not line.strip():
                break
            cells = _cells(line, starts)
            if rows and not cells[0]:  # continuation of the previous row
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
            else:
                rows.append(cells)
            j += 1
        if borders < 2 or not rows:
            out.append(lines[i])
            i += 1
            continue
        if borders == 3 and header_rows:
            head, body = rows[:header_rows], rows[header_rows:]
            head = [[" ".join(c).strip() for c in zip(*head)]]
        else:
            head, body = [[""] * len(starts)], rows
        if out and out[-1].strip():
            out.append("")
        out.append(_pipe(head[0]))
        out.append("| " + " | ".join("---" for _ in starts) + " |")
        out.extend(_pipe(r) for r in body)
        out.append("")
        i = j
    return "\n".join(out)


def _literal_markers(text: str) -> str:
    text = re.sub(r"(?m)^\s*::\s*$", "", text)          # a lone "::" line
    text = re.sub(r"(?m)(\S)\s*::\s*$", r"\1:", text)   # "text::" -> "text:"
    return text


def convert(text: str, obj: griffe.Object) -> str:
    """The Markdown reading of one reST-flavoured docstring."""
    text = _tables(text)
    text = _literal_markers(text)
    return ROLE.sub(lambda m: _role(m, obj), text)


# modules whose public functions exist only at run time
DYNAMIC_MODULES = ("lrp_kernels.ops.functional", "lrp_kernels.ops.grad")


def _graft(pkg: griffe.Module, path: str) -> None:
    """Add the run-time functions of module ``path`` to its statically loaded twin."""
    static = pkg.get_member(path.split(".", 1)[1])
    live = importlib.import_module(path)
    names = list(getattr(live, "__all__", ()))
    parser = static.docstring.parser if static.docstring else None
    options = static.docstring.parser_options if static.docstring else None
    inspected = griffe.inspect(path, filepath=static.filepath, import_paths=sys.path,
                               docstring_parser=parser, docstring_options=options)
    for name in names:
        member = inspected.get_member(name)
        static.set_member(name, member)
        if not member.is_alias and member.docstring is not None:
            member.docstring.value = convert(member.docstring.value, member)
    static.exports = names


class RstDocstrings(griffe.Extension):
    """Translate reST roles, simple tables and ``::`` markers in every docstring; add the
    functions of the run-time built modules."""

    def on_object(self, *, obj: griffe.Object, loader: Any = None, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = convert(obj.docstring.value, obj)

    def on_package(self, *, pkg: griffe.Module, loader: Any = None, **kwargs: Any) -> None:
        if pkg.path != "lrp_kernels":
            return
        for path in DYNAMIC_MODULES:
            _graft(pkg, path)
