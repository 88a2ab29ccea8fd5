"""Hugging Face checkpoints <-> the Flax ports: the file-format layer under `lm.families`.

This module knows HF's files and how tensors are laid out in them, not the model classes: each
model family describes its tensors with a `Layout` (defined beside its model, e.g. `opt.LAYOUT`)
and `lm.families` builds the (abstract) model and calls in here (`load_state`, `hf_state_dict`,
`write_directory`), so the imports go one way only, families -> model -> convert.

A `Layout` maps each Flax parameter path to a `Tensor`: the HF tensor name it lives in and how
the layouts differ. The Flax paths of our ports mostly mirror HF's module names, so the default
rule (`Tensor.mechanical`) is

  Flax path                                         HF tensor name
  ('model', 'decoder', 'layers', 3, 'fc1', 'kernel') model.decoder.layers.3.fc1.weight
  (..., 'bias')                                     ....bias
  (..., 'embedding')                                ....weight   (nn.Embedding)
  (..., 'scale')                                    ....weight   (nn.LayerNorm, RMSNorm)

and the values differ only in layout (`Tensor.kind`):

- "linear": torch's `nn.Linear.weight` is [out, in] while our kernels are [in..., out...] with
  the head axis split out (e.g. [D, N, H] for q/k/v, `n_in=2` for an output projection
  [N, H, D]), so a kernel is `weight.T.reshape(kernel_shape)`. The reshape is valid because HF
  splits the N*H features row-major (`view(B, T, N, H)`), i.e. head-major, as `reshape(N, H)`.
- "conv1d": GPT-2's `Conv1D.weight` is already [in, out]: a reshape, no transpose.
- "bias": [out] flattened; "plain": the same shape (embeddings, norm scales).
- Fused tensors (GPT-2's `c_attn` [D, 3D], GPT-NeoX's `query_key_value` [3D, D]) hold several
  Flax parameters: `split` is the shape HF's output axis is viewed as, `split_axis` the axis
  the parts run along and `part` this parameter's index, e.g. `split=(3, N * H), split_axis=0`
  for GPT-2 (q | k | v blocks) and `split=(N, 3, H), split_axis=1` for NeoX (q, k, v
  interleaved per head).

A layout also says how to normalise the names a checkpoint uses (`normalise`: e.g. OPT's
original files say `decoder.*`, newer ones `model.decoder.*`; GPT-2's `h.*` or
`transformer.h.*`), which stored tensors are buffers to skip (`ignored`: GPT-2's `attn.bias`
causal masks, rotary `inv_freq`) and which tensor a tied head makes redundant (`tied`).

Checkpoints are read in this order of preference, none of them needing torch:

- `model.safetensors` or sharded safetensors (`model.safetensors.index.json`), through
  safetensors' NumPy API;
- `flax_model.msgpack`, a Hugging Face Flax model's parameter tree (e.g. `FlaxOPTForCausalLM`,
  `FlaxGPT2LMHeadModel`), a flax.serialization msgpack (it only decodes arrays; nothing is
  executed). Its paths are HF's module names and its leaves `kernel` [in, out] (for GPT-2's
  Conv1D too: HF Flax stores it transposed), `embedding`, `scale`, `bias`, so each becomes the
  HF tensor of the same name with `kernel.T` as `weight` (`convert_flax_state_dict_to_pytorch`'s
  rule) and then follows the common path below; a tied model has no `lm_head` there;
- `pytorch_model.bin` (+ `.index.json`), through `lm.torchfile`'s restricted unpickler (tensor
  rebuilds only; a pickle naming any other global is refused), or through torch, when installed,
  for the pre-1.6 non-zip format.

facebook/opt-125m's main branch has no safetensors, so its `flax_model.msgpack` is what loads.
`write_directory` writes one `model.safetensors`, or shards with an index above `max_shard_size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
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
_KINDS = ("linear", "conv1d", "bias", "plain")

Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Tensor:
    """Where one Flax parameter lives in an HF checkpoint, and how the layouts differ.

    Attributes:
      name: the HF tensor name (canonical form, after the layout's `normalise`).
      kind: "linear" (torch [out, in]: transposed), "conv1d" (GPT-2's [in, out]), "bias"
        (flattened [out]) or "plain" (same shape: embeddings, norm scales).
      n_in: number of leading input axes of a linear/conv1d kernel ([N, H, D] out_proj: 2).
      split: fused tensors only: the shape HF's output axis is viewed as, e.g. (3, N * H).
      split_axis: the axis of `split` the fused parts run along.
      part: this parameter's index along `split_axis`.
    """

    name: str
    kind: str = "plain"
    n_in: int = 1
    split: tuple[int, ...] | None = None
    split_axis: int = 0
    part: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Tensor.kind must be one of {_KINDS}, got {self.kind!r}")

    @classmethod
    def mechanical(cls, path: Path, *, n_in: int = 1, kind: str | None = None) -> Tensor:
        """The default rule: HF name = the path's modules + the leaf's HF suffix; kernels are
        torch Linear weights ("linear"), biases flattened, embeddings and scales as they are."""
        *modules, leaf = path
        if leaf not in _LEAF_TO_HF:
            raise ValueError(f"parameter {path} has no HF name (leaf {leaf!r} unknown)")
        name = ".".join([str(p) for p in modules] + [_LEAF_TO_HF[leaf]])
        if kind is None:
            kind = {"kernel": "linear", "bias": "bias"}.get(leaf, "plain")
        return cls(name, kind, n_in)

    @property
    def parts(self) -> int:
        return 1 if self.split is None else self.split[self.split_axis]

    def _lead(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(in,) for kernels, () otherwise: the axes before HF's output axis, in Flax order."""
        return (math.prod(shape[: self.n_in]),) if self.kind in ("linear", "conv1d") else ()

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole HF tensor's shape, from one Flax part of `shape`."""
        if self.kind == "plain":
            return tuple(shape)
        lead = self._lead(shape)
        out = math.prod(shape) // math.prod(lead) * self.parts
        if self.kind == "linear":
            return (out, *lead)
        return (*lead, out)

    def to_flax(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> this Flax parameter (transpose, take the fused part, split heads)."""
        if self.kind == "plain":
            return tensor.reshape(shape)
        t = tensor.T if self.kind == "linear" else tensor  # [in, out] or [out]
        if self.split is not None:
            lead = t.shape[:-1]
            t = np.take(t.reshape(lead + self.split), self.part, axis=len(lead) + self.split_axis)
        return np.ascontiguousarray(t).reshape(shape)

    def to_hf(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Flax parameters (every part of a fused tensor, in `part` order) -> the HF tensor."""
        if self.kind == "plain":
            (value,) = values
            return value
        lead = self._lead(values[0].shape)
        if self.split is None:
            (value,) = values
            t = value.reshape(lead + (-1,))
        else:
            rest = tuple(s for i, s in enumerate(self.split) if i != self.split_axis)
            t = np.stack([v.reshape(lead + rest) for v in values], axis=len(lead) + self.split_axis)
            t = t.reshape(lead + (-1,))
        return np.ascontiguousarray(t.T) if self.kind == "linear" else t


def _same_name(name: str) -> str:
    return name


@dataclasses.dataclass(frozen=True)
class Layout:
    """One family's map between its Flax parameters and HF's tensors.

    Attributes:
      tensor: Flax parameter path -> its `Tensor` (several paths may share a fused tensor).
      normalise: a checkpoint's tensor name -> the canonical name `tensor` uses (prefixes).
      ignored: regular expressions (full match, on normalised names) of stored tensors that
        are not parameters and are skipped (causal-mask buffers, rotary `inv_freq`).
      tied: names a tied LM head makes redundant (skipped when the model ties its head).
    """

    tensor: Callable[[Path], Tensor] = Tensor.mechanical
    normalise: Callable[[str], str] = _same_name
    ignored: tuple[str, ...] = ()
    tied: tuple[str, ...] = ("lm_head.weight",)

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.ignored)


def hf_state_dict(model: nnx.Module, layout: Layout) -> dict[str, np.ndarray]:
    """The model's parameters as an HF state dict of NumPy arrays (tied head omitted).

    Args:
      model: the Flax model.
      layout: its family's layout.

    Returns:
      `{hf_name: array}` in HF layouts and the parameters' own dtype.
    """
    groups: dict[str, list[tuple[Tensor, np.ndarray]]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        tensor = layout.tensor(path)
        groups.setdefault(tensor.name, []).append((tensor, np.asarray(jax.device_get(var[...]))))
    out = {}
    for name, parts in groups.items():
        parts.sort(key=lambda p: p[0].part)
        if [p[0].part for p in parts] != list(range(parts[0][0].parts)):
            raise ValueError(f"layout error: {name} has parts {[p[0].part for p in parts]}")
        out[name] = parts[0][0].to_hf([value for _, value in parts])
    return out


class _TensorSource:
    """Lazily reads named tensors from the checkpoint files of one HF directory."""

    def __init__(self, directory: pathlib.Path, layout: Layout):
        self.directory = directory
        self.layout = layout
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
                f"{directory}: no model weights found (expected {SAFETENSORS_NAME}, "
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
            self._add_name(name, file)

    def _add_name(self, name: str, file: pathlib.Path) -> None:
        normal = self.layout.normalise(name)
        if not self.layout.is_ignored(normal):
            self.files[normal] = file
            self.raw_names[normal] = name

    def _add_file(self, file: pathlib.Path) -> None:
        for name in self._names_in(file):
            self._add_name(name, file)

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
    abstract_state: nnx.State,
    source: _TensorSource,
    layout: Layout,
    tied_head: bool,
    param_dtype: Any,
) -> nnx.State:
    expected: dict[str, list[tuple[Path, Any, Tensor]]] = {}
    for path, var in nnx.to_flat_state(abstract_state):
        tensor = layout.tensor(path)
        expected.setdefault(tensor.name, []).append((path, var, tensor))
    available = source.names()
    missing = sorted(set(expected) - available)
    if missing:
        raise ValueError(
            f"{source.directory}: checkpoint lacks tensors required by its config.json: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    ignorable = set(layout.tied) if tied_head else set()
    unexpected = sorted(available - set(expected) - ignorable)
    if unexpected:
        raise ValueError(
            f"{source.directory}: checkpoint has tensors its config.json does not describe: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    flat = []
    for name, parts in expected.items():
        stored = np.asarray(source.get(name))
        for path, var, tensor in parts:
            want = tensor.hf_shape(tuple(var.shape))
            if tuple(stored.shape) != want:
                raise ValueError(
                    f"{source.files[name]}: tensor {source.raw_names[name]!r} has shape "
                    f"{tuple(stored.shape)}, but config.json implies {want}"
                )
            value = tensor.to_flax(stored, tuple(var.shape))
            flat.append((path, var.replace(jnp.asarray(value, dtype=param_dtype))))
    return nnx.from_flat_state(flat)


def load_state(
    path: os.PathLike | str,
    abstract_state: nnx.State,
    layout: Layout,
    *,
    tied_head: bool,
    param_dtype: Any,
) -> nnx.State:
    """Reads the weights of an HF directory into the parameter state shaped like `abstract_state`.

    Args:
      path: the directory (its weights in any of the formats of the module docstring).
      abstract_state: `nnx.state` of the abstract model (`nnx.eval_shape`).
      layout: the family's layout (HF name and layout of each parameter).
      tied_head: the model ties its LM head to the embedding (a stored head, `layout.tied`, is
        then ignored).
      param_dtype: dtype of the returned parameters.

    Raises:
      FileNotFoundError: no weights in the directory, or a shard named by its index is missing.
      ValueError: a tensor is missing, unexpected, unreadable or misshapen.
    """
    source = _TensorSource(pathlib.Path(path), layout)
    try:
        return _tensors_to_state(abstract_state, source, layout, tied_head, param_dtype)
    finally:
        source.close()


def load_model(
    path: os.PathLike | str,
    config_class: type,
    model_class: type,
    layout: Layout,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> nnx.Module:
    """Reads an HF model directory into `model_class` (the loader under `lm.families` and
    `lm.opt`'s `load_pretrained`).

    Args:
      path: the directory (`config.json` and weights in any format of the module docstring).
      config_class: the family's config class (`from_hf_dict`).
      model_class: the family's model class, built as `model_class(config, dtype=...,
        param_dtype=..., rngs=..., attention_implementation=...)`.
      layout: the family's layout.
      dtype: compute dtype.
      param_dtype: parameter dtype (default: `dtype`).
      attention_implementation: None / "xla" or "cudnn" (see `lm.layers.attention`).

    Raises:
      FileNotFoundError: the directory, its config or its weights are missing.
      ValueError: (naming config.json) a config of another family or with unsupported options,
        or a weight missing, truncated or misshapen.
    """
    directory = pathlib.Path(path)
    try:
        config = config_class.from_hf_dict(read_config_dict(directory))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from e
    param_dtype = dtype if param_dtype is None else param_dtype
    graphdef, abstract_state = nnx.split(
        nnx.eval_shape(
            lambda: model_class(
                config,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(0),
                attention_implementation=attention_implementation,
            )
        )
    )
    state = load_state(
        directory,
        abstract_state,
        layout,
        tied_head=config.tie_word_embeddings,
        param_dtype=param_dtype,
    )
    return nnx.merge(graphdef, state)


def state_from_tensors(
    abstract_state: nnx.State,
    tensors: Mapping[str, np.ndarray],
    layout: Layout,
    *,
    tied_head: bool,
    param_dtype: Any,
) -> nnx.State:
    """`load_state` from an in-memory HF state dict `{name: array}` (names as a checkpoint has
    them: the layout normalises them)."""
    source = _MemorySource(tensors, layout)
    return _tensors_to_state(abstract_state, source, layout, tied_head, param_dtype)


class _MemorySource(_TensorSource):
    def __init__(self, tensors: Mapping[str, np.ndarray], layout: Layout):
        self.directory = pathlib.Path("<memory>")
        self.layout = layout
        self.kind = "memory"
        self._open = {}
        self.files = {}
        self.raw_names = {}
        self._tensors = {}
        for name, value in tensors.items():
            self._add_name(name, self.directory)
            self._tensors[layout.normalise(name)] = value

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name]


def dtype_name(dtype: Any) -> str:
    """HF's `dtype` entry of config.json for a parameter dtype."""
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        jnp.dtype(dtype).name, "float32"
    )


DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes; transformers' `save_pretrained` default (5GB)


def write_directory(
    path: os.PathLike | str,
    tensors: Mapping[str, np.ndarray],
    config: dict,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Writes `config.json` + `model.safetensors`, or shards `model-0000i-of-0000n.safetensors`
    with `model.safetensors.index.json` when the tensors exceed `max_shard_size` bytes (the
    directory is created if needed).

    Tensors are packed in their given order, a new shard starting when the next would pass the
    limit (a tensor larger than the limit gets a shard of its own), as transformers does. Each
    file is written to a temporary name and renamed (weights first, then the index, then the
    config), so a crash never leaves a torn file behind; a previous single file or index that
    the new layout does not use is removed.
    """
    from safetensors.numpy import save

    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}"
        )
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        nbytes = int(np.asarray(value).nbytes)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        fileio.atomic_write_bytes(directory / SAFETENSORS_NAME, save(dict(shards[0]), metadata))
        (directory / SAFETENSORS_INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            fileio.atomic_write_bytes(directory / filename, save(dict(shard), metadata))
            weight_map.update(dict.fromkeys(shard, filename))
            total += sum(int(np.asarray(v).nbytes) for v in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        fileio.atomic_write_text(
            directory / SAFETENSORS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
        (directory / SAFETENSORS_NAME).unlink(missing_ok=True)
    fileio.atomic_write_text(
        directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n"
    )


def save_model(
    model: nnx.Module,
    path: os.PathLike | str,
    layout: Layout,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Writes a model's `config.json` (`model.config.to_hf_dict()` with its parameter dtype) and
    safetensors weights in HF names and layouts (`write_directory`)."""
    config = model.config.to_hf_dict()
    config["dtype"] = dtype_name(model.param_dtype)
    write_directory(path, hf_state_dict(model, layout), config, max_shard_size=max_shard_size)
