"""Every example runs (at a small size) and checks itself against the dense reference."""

import importlib
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))
SMALL = {"natten": {"size": 32 * 8}, "paged_attention": {}}


def test_every_variant_has_an_example():
    expected = {"causal", "alibi", "sliding_window", "dilated_sliding_window", "document_mask", "prefix_lm",
                "softcapping", "relative_bias", "natten", "composed_masks", "paged_attention"}
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_runs(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(name)
    module.main(**SMALL.get(name, {"size": 256}))
    assert "max |" in capsys.readouterr().out
