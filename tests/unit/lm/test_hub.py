"""Hub ids (`facebook/opt-125m`) through a fake Hugging Face cache, with the network off."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from collapse_jax.lm import hub, opt
from tests.multihost_worker import tiny_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo="facebook/opt-125m", files=None):
    """The hub cache layout: models--owner--name/{refs/main, snapshots/<sha>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / SHA
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    for name, src in (files or {}).items():
        shutil.copy(src, snap / name)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_cache_offline(offline_cache, tmp_path):
    model = tiny_model()
    local = tmp_path / "local"
    opt.save_pretrained(model, local)
    snap = _fake_cache(offline_cache, files={f.name: f for f in local.iterdir()})
    assert hub.resolve("facebook/opt-125m") == snap
    loaded = opt.load_pretrained("facebook/opt-125m")
    ids = np.array([[2, 5, 9, 11, 3]], np.int32)
    np.testing.assert_array_equal(
        np.asarray(loaded(ids)), np.asarray(opt.load_pretrained(local)(ids))
    )


def test_tokenizer_hub_id(offline_cache, data_dir):
    tok = data_dir / "opt-125m-tokenizer"
    snap = _fake_cache(offline_cache, files={n: tok / n for n in ("vocab.json", "merges.txt")})
    assert hub.resolve("facebook/opt-125m", what="tokenizer") == snap


def test_missing_offline_says_what_to_do(offline_cache):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 and it is not in the hub cache"):
        hub.resolve("facebook/opt-350m")


def test_local_paths_pass_through(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve("no-such-folder") == hub.pathlib.Path("no-such-folder")
    assert hub.is_hub_id("facebook/opt-125m") and hub.is_hub_id("facebook/opt-125m@main")
    assert not hub.is_hub_id("./facebook/opt-125m") and not hub.is_hub_id("/abs/path")
    assert not hub.is_hub_id("a/b/c")
