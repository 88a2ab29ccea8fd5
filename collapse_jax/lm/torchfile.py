"""Tensors out of a PyTorch `pytorch_model.bin`, without torch and without running its pickle.

torch's `torch.save` format (since torch 1.6) is a zip archive: `<archive>/data.pkl`, a pickle of
the state dict, plus one raw little-endian buffer per storage at `<archive>/data/<key>` (and
`<archive>/byteorder` in newer files). In the pickle, every tensor is a call
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
whose `storage` is a persistent id `("storage", torch.<Type>Storage, key, location, numel)`, and
the dict is a `collections.OrderedDict`.

`read_state_dict` unpickles with a restricted `find_class` that resolves only those names (to
NumPy stand-ins written here): any other global, e.g. `os.system` or `builtins.eval`, is
refused before anything is called, with one line naming the file and the global. A pickle can
only call what `find_class` returns, so nothing but the stand-ins below ever runs.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage class -> NumPy dtype name (bfloat16 comes from ml_dtypes, loaded on demand).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}


class RefusedPickle(ValueError):
    """The pickle names something other than a tensor rebuild, a storage class or an OrderedDict."""


class _StorageType:
    """Stand-in for `torch.<Type>Storage`: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        dtype_name = _STORAGE_DTYPES[self.name]
        if dtype_name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(dtype_name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    """NumPy stand-in for `torch._utils._rebuild_tensor_v2`: a copy of the strided view."""
    del requires_grad, hooks, metadata
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise RefusedPickle("a tensor rebuild got something other than a storage")
    size, stride = tuple(size), tuple(stride)
    ints = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise RefusedPickle(f"tensor with invalid layout (size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise RefusedPickle(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) runs past its "
            f"storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedPickle(f"its pickle calls {module}.{name}, which is not tensor data")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise RefusedPickle(f"its pickle has an unknown persistent id {str(pid)[:60]!r}")
        _, storage_type, key, _, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError as e:
                raise RefusedPickle(f"storage data/{key} is missing from the archive") from e
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise RefusedPickle(f"storage data/{key} is truncated")
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        return self._storages[key]


def is_zip_checkpoint(path: os.PathLike | str) -> bool:
    """Whether `path` is torch's zip format (the legacy pre-1.6 format is a bare pickle)."""
    return zipfile.is_zipfile(path)


def read_state_dict(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """The tensors of a zip-format `torch.save` file, as NumPy arrays, never running its pickle.

    Args:
      path: the file (e.g. `pytorch_model.bin`).

    Returns:
      `{name: array}` for every tensor entry of the saved dict (other entries are skipped);
      bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays.

    Raises:
      ValueError: the file is no torch zip archive, its pickle names anything but tensor data
        (one line naming the file and the global it wanted), or its data is inconsistent.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a PyTorch zip checkpoint ({e})") from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byte order {byteorder!r}")
        try:
            state = _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()
        except RefusedPickle as e:
            raise ValueError(f"{path}: refused to load: {e}") from None
        except Exception as e:  # noqa: BLE001 -- a malformed pickle fails in many ways
            raise ValueError(
                f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a saved dict of tensors, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
