"""Mesh construction and the logical-axis rules (the only place mesh axes are named)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from collapse_jax.jaxtools import sharding
from collapse_jax.lm import families


def test_make_mesh_shapes():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh({"fsdp": -1, "tensor": 2}).shape) == {
        "data": 1,
        "fsdp": 4,
        "tensor": 2,
    }
    cfg = sharding.MeshConfig(data=2, fsdp=2, tensor=2)
    assert dict(sharding.make_mesh(cfg).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    small = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    assert small.devices.size == 2
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1})


def test_batch_spec_only_names_axes_the_mesh_has():
    full = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_spec(full) == P(("data", "fsdp"))
    assert sharding.batch_spec() == P(("data", "fsdp"))
    data_only = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert sharding.batch_spec(data_only) == P(("data",))
    assert sharding.data_parallel_size(data_only) == 4
    tensor_only = sharding.make_mesh({"tensor": 8})
    assert sharding.batch_spec(tensor_only) == P(None)
    assert sharding.data_parallel_size(full) == 4


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (10, 8), mesh) == P("tensor", "fsdp")
    # Head_dim is replicated by rule; a dimension the axis does not divide falls back to None.
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (8, 3, 4), mesh) == P(
        "fsdp", None, None
    )
    assert sharding.logical_to_spec((None, "embed"), (7, 8), mesh) == P(None, "fsdp")
    # A mesh axis shards at most one dimension of an array.
    assert sharding.logical_to_spec(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)
    # Size-1 axes are dropped.
    dp = sharding.make_mesh({"data": 8})
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), dp) == P(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("bogus",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (4, 4), mesh)


def _tiny_opt():
    from collapse_jax.lm import families, opt

    cfg = opt.OPTConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=30,
        word_embed_proj_dim=8,
        tie_word_embeddings=False,
    )
    # Abstract (no initializer runs): only shapes and annotations matter here.
    return nnx.eval_shape(lambda: families.init_random(cfg, jax.random.key(0)))


def test_every_opt_parameter_matches_a_rule_and_gets_its_spec():
    model = _tiny_opt()
    params = nnx.state(model, nnx.Param)
    assert sharding.unmatched_logical_names(params) == {}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.logical_to_sharding(params, mesh)
    specs = {
        jax.tree_util.keystr(p): v.get_value().spec
        for p, v in jax.tree_util.tree_leaves_with_path(
            shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    }
    dec = "['model']['decoder']"
    layer = dec + "['layers'][0]"
    want = {
        dec + "['embed_tokens']['embedding']": P("tensor", "fsdp"),  # [64, 8]
        dec + "['embed_positions']['embedding']": P(None, "fsdp"),  # [32, 16]
        dec + "['project_in']['kernel']": P(None, "fsdp"),
        dec + "['project_out']['kernel']": P("fsdp", None),
        layer + "['self_attn']['q_proj']['kernel']": P("fsdp", "tensor", None),
        layer + "['self_attn']['q_proj']['bias']": P("tensor", None),
        layer + "['self_attn']['out_proj']['kernel']": P("tensor", None, "fsdp"),
        layer + "['fc1']['kernel']": P("fsdp", "tensor"),
        layer + "['fc2']['kernel']": P("tensor", "fsdp"),
        layer + "['fc1']['bias']": P("tensor"),
        layer + "['final_layer_norm']['scale']": P("fsdp"),
        "['lm_head']['kernel']": P("fsdp", "tensor"),  # [E=8, V=64] ("embed", "vocab")
    }
    for k, spec in want.items():
        assert specs[k] == spec, k
    zeros = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), params)
    placed = jax.device_put(zeros, shardings)
    for p, x in jax.tree_util.tree_leaves_with_path(placed):
        key = jax.tree_util.keystr(p).removesuffix(".value")
        assert x.sharding.spec == specs[key]


def test_unannotated_variable_is_reported():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((2, 2), np.float32))
            self.v = nnx.Param(
                np.zeros((2,), np.float32), out_sharding=("nonsense",), eager_sharding=False
            )

    bad = sharding.unmatched_logical_names(nnx.state(M(), nnx.Param))
    assert set(bad) == {"['v']", "['w']"}


def test_explicit_axes_are_normalised_to_auto():
    explicit = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    auto = sharding.with_auto_axes(explicit)
    assert auto.axis_types == (AxisType.Auto, AxisType.Auto)
    assert auto.axis_names == explicit.axis_names and auto.devices.shape == (2, 4)
    full = sharding.make_mesh()
    assert sharding.with_auto_axes(full) is full


@pytest.mark.parametrize("family", [f.name for f in families.FAMILIES])
def test_every_family_annotates_its_parameters_with_the_rules_names(family):
    """Each family's parameters carry logical names of the ONE rules table, and a tensor- and
    fsdp-sharded mesh places them (whole heads on "tensor")."""
    fam = families.family_named(family)
    config = fam.config_class.from_hf_dict(
        {
            "model_type": fam.model_types[0],
            "vocab_size": 64,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "ffn_dim": 32,
            "max_position_embeddings": 32,
            "tie_word_embeddings": False,
        }
    )
    params = nnx.state(families.abstract_model(config), nnx.Param)
    assert sharding.unmatched_logical_names(params) == {}
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), path
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.logical_to_sharding(params, mesh)
    zeros = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), params)
    jax.device_put(zeros, shardings)  # every shape divides by its mesh axes
