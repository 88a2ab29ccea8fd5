"""HF OPT directories <-> the Flax port: every file layout, round trips, and clear errors."""

import json
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from collapse_jax.lm import (  # noqa: E402
    families,  # noqa: E402
)
from collapse_jax.lm.families import init_random, load_pretrained, save_pretrained  # noqa: E402
from collapse_jax.lm.opt import OPTConfig  # noqa: E402
from tests.helpers_opt import (  # noqa: E402
    TINY_OPT,
    hf_forward,
    jit_forward,
    load_hf_model,
    make_hf_opt_dir,
    random_batch,
)

STD = 0.3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # Post-LN with project_in/out (opt-350m's shape) and an untied head: the most mapping work.
    return make_hf_opt_dir(
        tmp_path_factory.mktemp("convert"),
        seed=11,
        init_std=STD,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
        tie_word_embeddings=False,
    )


def _params(model) -> dict[str, np.ndarray]:
    return families.hf_state_dict(model)


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.mark.torch
def test_state_dict_round_trip_is_exact(hf_dir):
    """HF tensors -> ours -> HF tensors reproduces every tensor bit for bit."""
    original = load_file(str(hf_dir / "model.safetensors"))
    model = load_pretrained(hf_dir)
    back = families.hf_state_dict(model)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        np.testing.assert_array_equal(back[name], tensor, err_msg=name)
    # The in-memory conversion gives the same state.
    state = families.state_from_hf(model.config, original)
    for (p, a), (q, b) in zip(
        nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(model)), strict=True
    ):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


@pytest.mark.torch
@pytest.mark.parametrize("tied", [True, False])
def test_save_then_transformers_loads_same_logits(tmp_path, tied):
    """ours (random init) -> save_pretrained -> transformers -> same logits; and load -> save."""
    cfg = OPTConfig(
        **{k: v for k, v in TINY_OPT.items() if k != "word_embed_proj_dim"},
        word_embed_proj_dim=16,
        tie_word_embeddings=tied,
        init_std=STD,
    )
    model = init_random(cfg, jax.random.key(1))
    ids, mask = random_batch(0, cfg.vocab_size, [8, 3, 6])
    ours = np.asarray(jit_forward(model, ids, mask))
    save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    hf = load_hf_model(tmp_path / "saved")
    assert hf.config.tie_word_embeddings == tied
    ref, _ = hf_forward(hf, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 1.0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # load -> save -> load is the identity.
    again = load_pretrained(tmp_path / "saved")
    _assert_same_params(model, again)


@pytest.mark.torch
def test_load_save_hf_round_trip(hf_dir, tmp_path):
    """HF dir -> load_pretrained -> save_pretrained -> transformers gives the original logits."""
    ids, mask = random_batch(1, TINY_OPT["vocab_size"], [7, 2])
    ref, _ = hf_forward(load_hf_model(hf_dir), ids, mask)
    save_pretrained(load_pretrained(hf_dir), tmp_path / "again")
    out, _ = hf_forward(load_hf_model(tmp_path / "again"), ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-6, rtol=0)


@pytest.mark.torch
def test_pytorch_model_bin(hf_dir, tmp_path):
    bin_dir = make_hf_opt_dir(
        tmp_path,
        seed=11,
        init_std=STD,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
        tie_word_embeddings=False,
        safe_serialization=False,
    )
    assert (bin_dir / "pytorch_model.bin").is_file()
    assert not (bin_dir / "model.safetensors").exists()
    reference = load_pretrained(hf_dir)
    _assert_same_params(load_pretrained(bin_dir), reference)
    # Sharded torch checkpoints (pytorch_model.bin.index.json), as older big OPTs ship.
    state = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, bin_dir / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (bin_dir / "pytorch_model.bin").unlink()
    _assert_same_params(load_pretrained(bin_dir), reference)


@pytest.mark.torch
def test_pytorch_model_bin_without_torch(hf_dir, tmp_path, monkeypatch):
    """The zip-format .bin reads through lm.torchfile, with torch unimportable."""
    bin_dir = make_hf_opt_dir(tmp_path, seed=0, safe_serialization=False)
    reference = load_pretrained(bin_dir)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _assert_same_params(load_pretrained(bin_dir), reference)


@pytest.mark.torch
def test_sharded_safetensors(hf_dir, tmp_path):
    hf = load_hf_model(hf_dir)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    _assert_same_params(load_pretrained(tmp_path / "sharded"), load_pretrained(hf_dir))


@pytest.mark.torch
def test_legacy_decoder_prefix(hf_dir, tmp_path):
    """The original facebook/opt-* files name tensors `decoder.*` (saved from OPTModel)."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(hf_dir / "config.json", legacy / "config.json")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    renamed = {k.removeprefix("model."): v for k, v in tensors.items()}
    assert any(k.startswith("decoder.") for k in renamed)
    save_file(renamed, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_params(load_pretrained(legacy), load_pretrained(hf_dir))


@pytest.mark.torch
def test_bfloat16_save_and_load(hf_dir, tmp_path):
    model = load_pretrained(hf_dir, dtype=jnp.bfloat16)
    save_pretrained(model, tmp_path / "bf16")
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(str(t.dtype) == "bfloat16" for t in saved.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_params(load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16), model)
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert hf.model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16


def _copy(hf_dir, dst):
    shutil.copytree(hf_dir, dst)
    return dst


@pytest.mark.torch
def test_errors_name_the_problem(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(empty)

    # A model type no family serves: one line naming the supported ones.
    bert = _copy(hf_dir, tmp_path / "bert")
    cfg = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported model"):
        load_pretrained(bert)

    # Weights missing.
    no_weights = _copy(hf_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_pretrained(no_weights)

    # Truncated weight file.
    truncated = _copy(hf_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(truncated)

    # A tensor whose shape disagrees with config.json: the file and the tensor are named.
    bad = _copy(hf_dir, tmp_path / "bad_shape")
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.decoder.layers.1.fc1.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.1\.fc1\.weight.*\(39, 24\)"):
        load_pretrained(bad)

    # config.json disagrees with the file as a whole (more layers than stored).
    deeper = _copy(hf_dir, tmp_path / "deeper")
    (deeper / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="lacks tensors.*layers.3"):
        load_pretrained(deeper)

    # Extra tensors the config does not describe (e.g. biases with enable_bias=False).
    nobias = _copy(hf_dir, tmp_path / "nobias")
    (nobias / "config.json").write_text(json.dumps({**cfg, "enable_bias": False}))
    with pytest.raises(ValueError, match="does not describe.*bias"):
        load_pretrained(nobias)

    # A sharded index pointing at a missing shard.
    sharded = tmp_path / "sharded"
    load_hf_model(hf_dir).save_pretrained(sharded, max_shard_size="8KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_pretrained(sharded)
