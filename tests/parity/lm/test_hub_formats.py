"""`load_pretrained("facebook/opt-125m")` from every weight format the hub serves, offline.

A random tiny transformers OPT is the reference. Its weights are written as the hub serves them
(`model.safetensors`, HF Flax's `flax_model.msgpack`, torch's `pytorch_model.bin`) into a hub
cache laid out as huggingface_hub lays it out under a temporary HF_HOME, and the id is loaded with
HF_HUB_OFFLINE=1. torch only writes the files here; `pytorch_model.bin` is also read with torch
made unimportable (a torch-free install).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import serialization  # noqa: E402

from collapse_jax.lm import (  # noqa: E402
    families,  # noqa: E402
)
from tests.helpers_opt import load_hf_model, make_hf_opt_dir  # noqa: E402

SHA = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "facebook/opt-125m"
# HF Flax modules (modeling_flax_opt.py) of each torch module: nn.Dense has `kernel` [in, out],
# nn.Embed `embedding`, nn.LayerNorm `scale`; every one keeps `bias`.
_DENSE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "project_in", "project_out")


def _flax_tree(state: dict[str, np.ndarray], tied: bool, root: str) -> dict:
    """A torch OPT state dict as HF Flax's parameter tree (FlaxOPTForCausalLM when root="model",
    FlaxOPTModel when root="decoder"; a tied model has no lm_head there)."""
    tree: dict = {}
    for name, value in state.items():
        if tied and name == "lm_head.weight":
            continue
        *modules, leaf = name.split(".")
        module = modules[-1]
        if leaf == "weight":
            if module in _DENSE or module == "lm_head":
                leaf, value = "kernel", value.T
            elif module in ("embed_tokens", "embed_positions"):
                leaf = "embedding"
            else:
                leaf = "scale"
        if root == "decoder":
            modules = modules[1:]  # FlaxOPTModel's tree starts at the decoder
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        node[leaf] = np.ascontiguousarray(value)
    return tree


def _hub_cache(home, files: dict[str, bytes]):
    """huggingface_hub's layout: hub/models--org--name/{refs/main, snapshots/<sha>/...}."""
    base = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = base / "snapshots" / SHA
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SHA)
    for name, content in files.items():
        (snap / name).write_bytes(content)
    return snap


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def reference(request, tmp_path_factory):
    tied = request.param
    hf_dir = make_hf_opt_dir(
        tmp_path_factory.mktemp("ref"),
        seed=5,
        init_std=0.3,
        word_embed_proj_dim=16,  # project_in/out, as opt-350m has
        tie_word_embeddings=tied,
    )
    model = load_hf_model(hf_dir)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return hf_dir, model, state, tied


def _files(fmt, hf_dir, model, state, tied, tmp_path) -> dict[str, bytes]:
    files = {"config.json": (hf_dir / "config.json").read_bytes()}
    if fmt == "safetensors":
        files["model.safetensors"] = (hf_dir / "model.safetensors").read_bytes()
    elif fmt.startswith("flax"):
        root = "decoder" if fmt == "flax_base" else "model"
        tree = _flax_tree(state, tied, root)
        files["flax_model.msgpack"] = serialization.msgpack_serialize(tree)
    else:
        # The original facebook/opt-* .bin names tensors `decoder.*` (saved from OPTModel).
        sd = model.state_dict()
        if fmt == "bin_legacy_names":
            sd = {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}
        torch.save(sd, tmp_path / "w.bin")
        files["pytorch_model.bin"] = (tmp_path / "w.bin").read_bytes()
    return files


@pytest.mark.torch
@pytest.mark.parametrize(
    "fmt", ["safetensors", "flax", "flax_base", "bin", "bin_legacy_names", "bin_no_torch"]
)
def test_every_format_gives_the_reference_parameters(reference, fmt, tmp_path, monkeypatch):
    hf_dir, model, state, tied = reference
    if fmt in ("bin_legacy_names", "flax_base") and not tied:
        pytest.skip("OPTModel files have no lm_head: only tied models ship that way")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = _files(fmt.replace("_no_torch", ""), hf_dir, model, state, tied, tmp_path)
    snap = _hub_cache(tmp_path / "hf", files)
    if fmt == "bin_no_torch":
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    loaded = families.load_pretrained(REPO)
    got = families.hf_state_dict(loaded)
    want = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{fmt}: {name}")
    assert sorted(p.name for p in snap.iterdir()) == sorted(files)


@pytest.mark.torch
def test_bfloat16_bin_without_torch(tmp_path, monkeypatch):
    """bf16 storages come back as ml_dtypes.bfloat16, bit for bit."""
    import ml_dtypes

    from collapse_jax.lm import torchfile

    w = torch.randn(5, 3).to(torch.bfloat16)
    torch.save({"w": w, "wt": w.t(), "n": torch.arange(4)}, tmp_path / "x.bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    out = torchfile.read_state_dict(tmp_path / "x.bin")
    assert out["w"].dtype == ml_dtypes.bfloat16
    ref = w.float().numpy()
    np.testing.assert_array_equal(out["w"].astype(np.float32), ref)
    np.testing.assert_array_equal(out["wt"].astype(np.float32), ref.T)
    np.testing.assert_array_equal(out["n"], np.arange(4))


@pytest.mark.torch
def test_legacy_non_zip_bin(reference, tmp_path, monkeypatch):
    """The pre-1.6 (non-zip) torch format loads through torch; without torch, one line says so."""
    hf_dir, model, state, tied = reference
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(json.loads((hf_dir / "config.json").read_text())))
    torch.save(model.state_dict(), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    got = families.hf_state_dict(families.load_pretrained(d))
    np.testing.assert_array_equal(
        got["model.decoder.layers.0.fc1.weight"], state["model.decoder.layers.0.fc1.weight"]
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"legacy .*needs torch") as info:
        families.load_pretrained(d)
    assert "\n" not in str(info.value)
