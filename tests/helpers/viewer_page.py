"""Read a viewer page (:mod:`lrp_kernels.explanations.viewer`) with Python's HTML parser,
independently of the viewer's code: tags, ids, attributes, script bodies, the embedded data."""
import base64
import json
from html.parser import HTMLParser

import torch


class Page(HTMLParser):
    """Tags, ids, attributes and script bodies of a document."""

    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.attrs, self.scripts = [], set(), [], []
        self._script = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        d = dict(attrs)
        if "id" in d:
            self.ids.add(d["id"])
        if tag == "script":
            self._script = [d, ""]

    def handle_data(self, data):
        if self._script is not None:
            self._script[1] += data

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append(tuple(self._script))
            self._script = None


def parse(doc):
    page = Page()
    page.feed(doc)
    data = [body for attrs, body in page.scripts if attrs.get("id") == "lrp-data"]
    assert len(data) == 1
    return page, json.loads(data[0])


def decode(entry):
    q = torch.frombuffer(bytearray(base64.b64decode(entry["q"])), dtype=torch.int8).double()
    return q * entry["scale"] / 127
