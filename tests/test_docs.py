"""The ```python blocks of every doc run, in order, one namespace per file, so docs cannot rot."""

import importlib
import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).parents[1] / "docs").glob("*.md")) + [Path(__file__).parents[1] / "README.md"]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_python_blocks_run(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - our own docs


def _resolve(dotted: str):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


API_ROWS = re.findall(r"^\| `(torch\.[\w.]+)` \| `(flexattn\.[\w.]+)` \|", (DOCS[0].parent / "api.md").read_text(),
                      flags=re.M)


@pytest.mark.parametrize("theirs, ours", API_ROWS, ids=[t for t, _ in API_ROWS])
def test_api_table_names_exist_in_torch_and_flexattn(theirs, ours):
    assert _resolve(theirs) is not None and _resolve(ours) is not None


def test_api_table_lists_rows():
    assert len(API_ROWS) >= 10
