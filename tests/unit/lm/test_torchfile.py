"""The restricted `pytorch_model.bin` reader: tensor data only, anything else refused unrun.

The archives are built by hand in torch's zip layout (`<archive>/data.pkl` + `data/<key>`), so
these tests need no torch; tests/parity/lm/test_hub_formats.py reads files torch itself wrote.
"""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from collapse_jax.lm import families, opt, torchfile
from tests.multihost_worker import TINY


class _Global:
    """Pickles as a reference to the global `module.name` (what torch's classes pickle as)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class _Tensor:
    def __init__(self, key, storage, offset, size, stride):
        self.args = (key, storage, offset, size, stride)


class _Pickler(pickle.Pickler):
    """Writes the opcodes torch.save writes for a state dict of float32 tensors."""

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and obj and obj[0] == "storage":
            return obj
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Global):
            return NotImplemented
        if isinstance(obj, _Tensor):
            key, storage, offset, size, stride = obj.args
            pid = ("storage", _StorageClass, key, "cpu", storage.size)
            return (_rebuild, (pid, offset, size, stride, False, collections.OrderedDict()))
        return NotImplemented


def _rebuild():  # replaced by name below: pickles as torch._utils._rebuild_tensor_v2
    raise AssertionError


class _StorageClass:  # pickles as torch.FloatStorage
    pass


_rebuild.__module__, _rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
_StorageClass.__module__, _StorageClass.__qualname__ = "torch", "FloatStorage"


def _write_archive(path, obj, storages):
    buf = io.BytesIO()
    import sys
    import types

    # Let pickle find the stand-ins under torch's names while writing (no torch needed).
    fake_torch = types.ModuleType("torch")
    fake_torch.FloatStorage = _StorageClass
    fake_utils = types.ModuleType("torch._utils")
    fake_utils._rebuild_tensor_v2 = _rebuild
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        _Pickler(buf, protocol=2).dump(obj)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, arr in storages.items():
            z.writestr(f"archive/data/{key}", np.asarray(arr, "<f4").tobytes())
    return path


def test_reads_tensors_and_shared_strided_storages(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    state = collections.OrderedDict(
        a=_Tensor("0", storage, 0, (3, 4), (4, 1)),
        a_t=_Tensor("0", storage, 0, (4, 3), (1, 4)),  # a transposed view of the same storage
        tail=_Tensor("0", storage, 10, (2,), (1,)),
    )
    path = _write_archive(tmp_path / "pytorch_model.bin", state, {"0": storage})
    out = torchfile.read_state_dict(path)
    np.testing.assert_array_equal(out["a"], storage.reshape(3, 4))
    np.testing.assert_array_equal(out["a_t"], storage.reshape(3, 4).T)
    np.testing.assert_array_equal(out["tail"], [10, 11])


def test_tensor_past_its_storage_is_refused(tmp_path):
    storage = np.arange(4, dtype=np.float32)
    state = {"w": _Tensor("0", storage, 2, (3,), (1,))}
    path = _write_archive(tmp_path / "pytorch_model.bin", state, {"0": storage})
    with pytest.raises(ValueError, match="refused to load: tensor .* runs past its storage"):
        torchfile.read_state_dict(path)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (builtins.eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    """A pickle that would run a shell command is refused with one line naming the file and the
    global; the command never runs (its marker file stays absent)."""
    marker = tmp_path / "pwned"
    bad = _System(f"touch {marker}")
    obj = {
        "system": {"w": bad},
        "eval": {"w": _Eval()},
        # hidden inside an allowed OrderedDict: the inner global still goes through find_class
        "nested": collections.OrderedDict(w=collections.OrderedDict(x=bad)),
    }[payload]
    path = _write_archive(tmp_path / "pytorch_model.bin", obj, {})
    with pytest.raises(ValueError) as info:
        torchfile.read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "refused to load" in message
    assert ("eval" if payload == "eval" else "system") in message
    assert not marker.exists()
    # Loading the folder as an OPT checkpoint refuses it the same way.
    (tmp_path / "config.json").write_text(json.dumps(opt.OPTConfig(**TINY).to_hf_dict()))
    with pytest.raises(ValueError, match="refused to load"):
        families.load_pretrained(tmp_path)
    assert not marker.exists()


def test_not_a_torch_archive(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("something.txt", "hi")
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
        torchfile.read_state_dict(path)
