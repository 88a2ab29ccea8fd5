"""WikiText-2 through `datasets` (a `save_to_disk` folder; the hub dataset's call with the network
off) and transformers' advisory "PyTorch was not found" line kept out of LM runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from collapse_jax.lm import data

ROWS = {"train": ["a\n", "", "b c\n"], "validation": [" v\n"], "test": ["t\n", ""]}


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in ROWS.items()})
    dd.save_to_disk(str(tmp_path / "wt"))
    assert data.load_wikitext_lines(tmp_path / "wt", "valid") == ROWS["validation"]
    assert data.load_wikitext_lines(tmp_path / "wt", "train") == ROWS["train"]


def test_hub_dataset_source(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):  # the network stays off
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ROWS[split]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.load_wikitext_lines("hf", "valid") == ROWS["validation"]
    assert data.load_wikitext_lines("hf:wikitext/wikitext-103-raw-v1", "test") == ROWS["test"]
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("wikitext", "wikitext-103-raw-v1", "test"),
    ]


@pytest.mark.parametrize("ours", [True, False])
def test_no_pytorch_advisory_line(data_dir, ours):
    """With torch hidden, importing transformers logs "PyTorch was not found"; our tokenizer
    loader keeps it out (the `ours=False` case shows the line would otherwise appear)."""
    tok = data_dir / "opt-125m-tokenizer"
    body = (
        f"from collapse_jax.lm.tokenizer import load_tokenizer; load_tokenizer({str(tok)!r})"
        if ours
        else "import transformers"
    )
    code = "import sys; sys.modules['torch'] = None\n" + body
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert ("PyTorch was not found" in out.stderr + out.stdout) is not ours
