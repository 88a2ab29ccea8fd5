"""The loaders DESIGN.md names: `collapse_jax.lm.load_pretrained` / `save_pretrained` (any
family) and `collapse_jax.lm.opt.load_pretrained` / `save_pretrained` (OPT only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import collapse_jax.lm as lm
from collapse_jax.lm import opt
from tests.multihost_worker import tiny_model


def test_package_and_opt_loaders_round_trip_the_same_logits(tmp_path):
    model = tiny_model()
    lm.save_pretrained(model, tmp_path / "a")
    opt.save_pretrained(model, tmp_path / "b")
    ids = np.array([[2, 5, 9, 11, 3]], np.int32)
    want = np.asarray(model(ids))
    for path in (tmp_path / "a", tmp_path / "b"):
        np.testing.assert_array_equal(np.asarray(lm.load_pretrained(path)(ids)), want)
        np.testing.assert_array_equal(np.asarray(opt.load_pretrained(path)(ids)), want)


def test_unsupported_model_types_are_one_line_naming_the_file(tmp_path):
    lm.save_pretrained(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'bert' is not supported; "):
        lm.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: config is not an OPT config"):
        opt.load_pretrained(tmp_path)
