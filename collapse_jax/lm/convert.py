"""Hugging Face OPT checkpoints <-> the Flax port: the file-format layer under `lm.opt`.

This module knows HF's tensor names, layouts and files, not the model classes: `lm.opt` builds
the (abstract) model and calls in here (`load_state`, `write_directory`), so the import goes one
way only, opt -> convert.

The Flax parameter paths mirror HF's module names, so the mapping is mechanical:

  Flax path                                         HF tensor name
  ('model', 'decoder', 'layers', 3, 'fc1', 'kernel') model.decoder.layers.3.fc1.weight
  (..., 'bias')                                     ....bias
  (..., 'embedding')                                ....weight   (nn.Embedding)
  (..., 'scale')                                    ....weight   (nn.LayerNorm)

and the values differ only in layout. torch's `nn.Linear.weight` is [out, in] while our kernels
are [in..., out...] with the head axis split out ([D, N, H] for q/k/v, [N, H, D] for out_proj), so
a kernel is `weight.T.reshape(kernel_shape)`. The reshape is valid because HF splits the N*H
features row-major (`view(B, T, N, H)`), i.e. head-major, exactly as `reshape(N, H)` does.

Checkpoints are read in this order of preference, none of them needing torch:

- `model.safetensors` or sharded safetensors (`model.safetensors.index.json`), through
  safetensors' NumPy API;
- `flax_model.msgpack`, Hugging Face Flax's `FlaxOPTForCausalLM` (or `FlaxOPTModel`) parameter
  tree, a flax.serialization msgpack (it only decodes arrays; nothing is executed). Its paths are
  our paths and its leaves `kernel` [in, out], `embedding`, `scale`, `bias`, so each becomes the
  HF tensor of the same name with `kernel.T` as `weight` (`convert_flax_state_dict_to_pytorch`'s
  rule) and then follows the common path below; a tied model has no `lm_head` there;
- `pytorch_model.bin` (+ `.index.json`), through `lm.torchfile`'s restricted unpickler (tensor
  rebuilds only; a pickle naming any other global is refused), or through torch, when installed,
  for the pre-1.6 non-zip format.

facebook/opt-125m's main branch has no safetensors, so its `flax_model.msgpack` is what loads.
The original facebook/opt-* files name tensors `decoder.*` (saved from `OPTModel`), newer ones
`model.decoder.*`; both are accepted.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from collapse_jax.config import MissingExtra
from collapse_jax.lm import torchfile
from collapse_jax.rundir import fileio

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
FLAX_NAME = "flax_model.msgpack"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# Leaf names of our parameters and the HF suffix each becomes.
_LEAF_TO_HF = {"kernel": "weight", "bias": "bias", "embedding": "weight", "scale": "weight"}

Path = tuple[Any, ...]


def hf_name(path: Path) -> str:
    """The HF tensor name of a Flax parameter path, e.g. `model.decoder.layers.0.fc1.weight`."""
    *modules, leaf = path
    return ".".join([str(p) for p in modules] + [_LEAF_TO_HF[leaf]])


def _num_in_axes(path: Path) -> int:
    # out_proj contracts (N, H); every other kernel contracts one axis.
    return 2 if "out_proj" in path else 1


def hf_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for a Flax parameter of `shape` at `path`."""
    if path[-1] == "kernel":
        n_in = _num_in_axes(path)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if path[-1] == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def to_flax(path: Path, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> Flax layout (transpose kernels, split heads)."""
    if path[-1] == "kernel":
        return np.ascontiguousarray(tensor.T).reshape(shape)
    return tensor.reshape(shape)


def to_hf(path: Path, value: np.ndarray) -> np.ndarray:
    """Flax value -> HF layout (merge heads, transpose kernels)."""
    if path[-1] == "kernel":
        n_in = _num_in_axes(path)
        in_size = math.prod(value.shape[:n_in])
        return np.ascontiguousarray(value.reshape(in_size, -1).T)
    if path[-1] == "bias":
        return value.reshape(-1)
    return value


def _normalise_name(name: str) -> str:
    # Checkpoints saved from OPTModel (the original facebook/opt-* files) lack the "model." prefix.
    return "model." + name if name.startswith("decoder.") else name


def hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as an HF state dict of NumPy arrays (tied head omitted).

    Args:
      model: the Flax model.

    Returns:
      `{hf_name: array}` in HF layouts and the parameters' own dtype.
    """
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[hf_name(path)] = to_hf(path, np.asarray(jax.device_get(var[...])))
    return out


class _TensorSource:
    """Lazily reads named tensors from the checkpoint files of one HF directory."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self._open: dict[pathlib.Path, Any] = {}
        self.files: dict[str, pathlib.Path] = {}  # normalised name -> file
        self.raw_names: dict[str, str] = {}  # normalised name -> name in the file
        if (directory / SAFETENSORS_NAME).is_file():
            self.kind = "safetensors"
            self._add_file(directory / SAFETENSORS_NAME)
        elif (directory / SAFETENSORS_INDEX_NAME).is_file():
            self.kind = "safetensors"
            self._add_index(directory / SAFETENSORS_INDEX_NAME)
        elif (directory / FLAX_NAME).is_file():
            self.kind = "flax"
            self._add_file(directory / FLAX_NAME)
        elif (directory / TORCH_NAME).is_file():
            self.kind = "torch"
            self._add_file(directory / TORCH_NAME)
        elif (directory / TORCH_INDEX_NAME).is_file():
            self.kind = "torch"
            self._add_index(directory / TORCH_INDEX_NAME)
        else:
            raise FileNotFoundError(
                f"{directory}: no OPT weights found (expected {SAFETENSORS_NAME}, "
                f"{SAFETENSORS_INDEX_NAME}, {FLAX_NAME}, {TORCH_NAME} or {TORCH_INDEX_NAME})"
            )

    def _add_index(self, index_file: pathlib.Path) -> None:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_file}: not a valid checkpoint index ({e!r})") from e
        for name, filename in weight_map.items():
            file = self.directory / filename
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} names shard {file}, which does not exist")
            self.files[_normalise_name(name)] = file
            self.raw_names[_normalise_name(name)] = name

    def _add_file(self, file: pathlib.Path) -> None:
        for name in self._names_in(file):
            self.files[_normalise_name(name)] = file
            self.raw_names[_normalise_name(name)] = name

    def _names_in(self, file: pathlib.Path) -> list[str]:
        return list(self._handle(file).keys())

    def _handle(self, file: pathlib.Path) -> Any:
        if file in self._open:
            return self._open[file]
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="np")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"{file}: cannot read safetensors file ({e})") from e
        elif self.kind == "flax":
            handle = _load_flax_file(file)
        else:
            handle = load_torch_file(file)
        self._open[file] = handle
        return handle

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        handle = self._handle(file)
        try:
            if self.kind == "safetensors":
                return handle.get_tensor(self.raw_names[name])
            return handle[self.raw_names[name]]
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {self.raw_names[name]!r} ({e})") from e

    def close(self) -> None:
        self._open.clear()


def _flax_leaf_to_hf(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    """One leaf of HF Flax's OPT tree -> (HF tensor name, tensor in torch's layout)."""
    *modules, leaf = path
    if leaf == "kernel":
        if value.ndim != 2:
            raise ValueError(f"kernel {'/'.join(path)} has {value.ndim} axes, expected 2")
        return ".".join([*modules, "weight"]), value.T
    if leaf in ("embedding", "scale"):
        return ".".join([*modules, "weight"]), value
    if leaf == "bias":
        return ".".join([*modules, "bias"]), value
    raise ValueError(f"unknown parameter {'/'.join(path)} (not kernel/embedding/scale/bias)")


def _load_flax_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads `flax_model.msgpack` (HF Flax OPT parameters) as HF-named tensors in torch layout."""
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as e:  # noqa: BLE001 -- msgpack raises several types for a corrupt file
        raise ValueError(f"{file}: cannot read Flax msgpack ({type(e).__name__}: {e})") from e
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]  # a whole variables dict rather than its params
    if not isinstance(tree, dict):
        raise ValueError(f"{file}: expected a parameter tree, got {type(tree).__name__}")
    out: dict[str, np.ndarray] = {}

    def visit(prefix: tuple[str, ...], node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit((*prefix, str(k)), v)
            return
        try:
            name, value = _flax_leaf_to_hf(prefix, np.asarray(node))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        out[name] = value

    visit((), tree)
    return out


def load_torch_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a `pytorch_model.bin` into NumPy arrays (bfloat16 via ml_dtypes).

    The zip format (torch >= 1.6) goes through `torchfile.read_state_dict`, torch or not; the
    legacy format needs torch (`torch.load(weights_only=True)`, which also refuses code).
    """
    if torchfile.is_zip_checkpoint(file):
        return torchfile.read_state_dict(file)
    try:
        import torch
    except ImportError as e:
        raise MissingExtra(
            f"{file} is a legacy (pre-1.6, non-zip) PyTorch checkpoint and reading it needs "
            "torch, which is not installed; install torch or convert it to model.safetensors"
        ) from e
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot read PyTorch checkpoint ({e})") from e
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            out[name] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def read_config_dict(path: os.PathLike | str) -> dict:
    """Reads `config.json` of an HF model directory (the raw dictionary)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
    try:
        d = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(d).__name__}")
    return d


def _tensors_to_state(
    abstract_state: nnx.State, source: _TensorSource, tied_head: bool, param_dtype: Any
) -> nnx.State:
    expected = {}
    for path, var in nnx.to_flat_state(abstract_state):
        expected[hf_name(path)] = (path, var)
    available = source.names()
    missing = sorted(set(expected) - available)
    if missing:
        raise ValueError(
            f"{source.directory}: checkpoint lacks tensors required by its config.json: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    ignorable = {"lm_head.weight"} if tied_head else set()
    unexpected = sorted(available - set(expected) - ignorable)
    if unexpected:
        raise ValueError(
            f"{source.directory}: checkpoint has tensors its config.json does not describe: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    flat = []
    for name, (path, var) in expected.items():
        tensor = source.get(name)
        want = hf_shape(path, tuple(var.shape))
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{source.files[name]}: tensor {source.raw_names[name]!r} has shape "
                f"{tuple(tensor.shape)}, but config.json implies {want}"
            )
        value = to_flax(path, np.asarray(tensor), tuple(var.shape))
        flat.append((path, var.replace(jnp.asarray(value, dtype=param_dtype))))
    return nnx.from_flat_state(flat)


def load_state(
    path: os.PathLike | str, abstract_state: nnx.State, *, tied_head: bool, param_dtype: Any
) -> nnx.State:
    """Reads the weights of an HF directory into the parameter state shaped like `abstract_state`.

    Args:
      path: the directory (its weights in any of the formats of the module docstring).
      abstract_state: `nnx.state` of the abstract model (`nnx.eval_shape`), HF-named paths.
      tied_head: the model ties its LM head to the embedding (a stored `lm_head.weight` is
        then ignored).
      param_dtype: dtype of the returned parameters.

    Raises:
      FileNotFoundError: no weights in the directory, or a shard named by its index is missing.
      ValueError: a tensor is missing, unexpected, unreadable or misshapen.
    """
    source = _TensorSource(pathlib.Path(path))
    try:
        return _tensors_to_state(abstract_state, source, tied_head, param_dtype)
    finally:
        source.close()


def state_from_tensors(
    abstract_state: nnx.State,
    tensors: Mapping[str, np.ndarray],
    *,
    tied_head: bool,
    param_dtype: Any,
) -> nnx.State:
    """`load_state` from an in-memory HF state dict `{name: array}` (with or without `model.`)."""
    return _tensors_to_state(abstract_state, _MemorySource(tensors), tied_head, param_dtype)


class _MemorySource(_TensorSource):
    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.directory = pathlib.Path("<memory>")
        self.kind = "memory"
        self._tensors = {_normalise_name(k): v for k, v in tensors.items()}
        self.files = {k: self.directory for k in self._tensors}
        self.raw_names = {k: k for k in self._tensors}
        self._open = {}

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name]


def dtype_name(dtype: Any) -> str:
    """HF's `dtype` entry of config.json for a parameter dtype."""
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        jnp.dtype(dtype).name, "float32"
    )


def write_directory(
    path: os.PathLike | str, tensors: Mapping[str, np.ndarray], config: dict
) -> None:
    """Writes `config.json` + `model.safetensors` (the directory is created if needed).

    Each file is written to a temporary name and renamed (weights first), so a crash never
    leaves a torn file behind.
    """
    from safetensors.numpy import save

    directory = pathlib.Path(path)
    fileio.atomic_write_bytes(
        directory / SAFETENSORS_NAME, save(dict(tensors), metadata={"format": "pt"})
    )
    fileio.atomic_write_text(
        directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
