"""Hub ids (`facebook/opt-125m`) through a fake Hugging Face cache, with the network off."""

from __future__ import annotations

import pathlib
import shutil
import sys

import numpy as np
import pytest

from collapse_jax.lm import families, hub
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
    families.save_pretrained(model, local)
    snap = _fake_cache(offline_cache, files={f.name: f for f in local.iterdir()})
    assert hub.resolve("facebook/opt-125m") == snap
    loaded = families.load_pretrained("facebook/opt-125m")
    ids = np.array([[2, 5, 9, 11, 3]], np.int32)
    np.testing.assert_array_equal(
        np.asarray(loaded(ids)), np.asarray(families.load_pretrained(local)(ids))
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


def test_download_fetches_the_first_weight_format_the_repo_has(tmp_path, monkeypatch):
    """Online, a repo with flax_model.msgpack and pytorch_model.bin (facebook/opt-125m's main)
    fetches the msgpack only; one with safetensors fetches those only."""
    import fnmatch

    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    remote = {"config.json", "generation_config.json", "flax_model.msgpack", "pytorch_model.bin"}
    requests = []

    def fake_snapshot_download(repo_id, revision, allow_patterns, cache_dir, local_files_only):
        assert not local_files_only and pathlib.Path(cache_dir) == cache
        requests.append(sorted(allow_patterns))
        snap = cache / "snap"
        snap.mkdir(parents=True, exist_ok=True)
        for name in remote:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snap / name).write_text("x")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = hub.resolve("facebook/opt-125m")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "flax_model.msgpack",
        "generation_config.json",
    ]
    assert len(requests) == 2  # safetensors (absent), then the msgpack
    shutil.rmtree(cache)
    remote.add("model.safetensors")
    requests.clear()
    folder = hub.resolve("facebook/opt-125m")
    assert "model.safetensors" in {p.name for p in folder.iterdir()} and len(requests) == 1
    assert "flax_model.msgpack" not in {p.name for p in folder.iterdir()}


def test_missing_datasets_extra_names_the_install_line(monkeypatch):
    from collapse_jax import cli
    from collapse_jax.config import MissingExtra
    from collapse_jax.lm import data

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(MissingExtra) as info:
        data.load_wikitext_lines("hf", "valid")
    code, line = cli.describe_failure(info.value)  # what the CLI prints, no traceback
    assert code == 2 and "pip install 'collapse-jax[hf]'" in line and "\n" not in line
