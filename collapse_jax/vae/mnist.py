"""MNIST loading for the VAE experiment: LeCun idx files, a Keras `mnist.npz`, or TFDS.

Sources accepted by `load_mnist(source, split)`:
- a directory holding the four LeCun idx files (`train-images-idx3-ubyte`, ...), plain or `.gz`
  (the `train-images.idx3-ubyte` spelling with a dot is accepted too);
- an `mnist.npz` file (or a directory holding one) in the Keras layout
  (`x_train`, `y_train`, `x_test`, `y_test`);
- the string `"tfds"` (or `"tfds:<data_dir>"`): tensorflow-datasets' `mnist`, where installed,
  downloaded into its data dir (`tfds:<data_dir>`, else `TFDS_DATA_DIR`) on first use and read
  from there afterwards.

Images come back as `uint8 [N, 28, 28]` and labels as `uint8 [N]`; `as_float` turns images
into `float32` in [0, 1]. Every file is validated (magic number, dimensions, payload size) and
errors name the file.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

SPLITS = ("train", "test")
_IDX_STEMS = {
    ("train", "images"): "train-images",
    ("train", "labels"): "train-labels",
    ("test", "images"): "t10k-images",
    ("test", "labels"): "t10k-labels",
}
_UBYTE = 0x08  # idx type code of unsigned bytes


def load_mnist(source: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Loads one MNIST split.

    Args:
      source: a directory of idx files (plain or .gz), an `mnist.npz` file or a directory that
        holds one, or `"tfds"` / `"tfds:<data_dir>"` for tensorflow-datasets.
      split: "train" (60000 images) or "test" (10000 images).
    Returns:
      (images uint8 [N, 28, 28], labels uint8 [N]).
    Raises:
      ValueError: unknown split, malformed file or tensorflow-datasets missing.
      FileNotFoundError: the source or one of its files does not exist.
    """
    if split not in SPLITS:
        raise ValueError(f"MNIST split must be one of {SPLITS}, got {split!r}")
    text = os.fspath(source)
    if text == "tfds" or text.startswith("tfds:"):
        return _load_tfds(split, text[5:] or None)
    path = pathlib.Path(text).expanduser()
    if path.is_file():
        return _load_npz(path, split)
    if not path.is_dir():
        raise FileNotFoundError(
            f"MNIST source not found: {path} (a folder of idx files or an npz); set "
            "COLLAPSE_JAX_DATA to the folder holding mnist/ (docs/data.md), or use "
            "data_dir: tfds (pip install 'collapse-jax[tfds]', downloads MNIST)"
        )
    if (path / "mnist.npz").is_file() and _find_idx(path, split, "images") is None:
        return _load_npz(path / "mnist.npz", split)
    images_file = _find_idx(path, split, "images")
    labels_file = _find_idx(path, split, "labels")
    for kind, f in (("images", images_file), ("labels", labels_file)):
        if f is None:
            stem = _IDX_STEMS[(split, kind)]
            raise FileNotFoundError(
                f"MNIST {split} {kind} not found in {path}: expected {stem}-idx"
                f"{3 if kind == 'images' else 1}-ubyte[.gz] (or mnist.npz)"
            )
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    _check_split(images, labels, split, f"{images_file} / {labels_file}")
    return images, labels


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (float input is checked and passed through)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    images = np.asarray(images, dtype=np.float32)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError("float images must lie in [0, 1]")
    return images


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file of unsigned bytes (plain or gzip-compressed).

    Args:
      path: the file.
    Returns:
      uint8 array whose shape is the file's dimensions.
    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: bad magic number, unsupported element type or wrong payload size.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _UBYTE:
        raise ValueError(f"{path}: idx element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: payload has {len(raw) - header} bytes, dimensions {dims} need {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: pathlib.Path, split: str, kind: str) -> pathlib.Path | None:
    stem = _IDX_STEMS[(split, kind)]
    rank = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            f = folder / f"{stem}{sep}idx{rank}-ubyte{suffix}"
            if f.is_file():
                return f
    return None


def _check_split(images: np.ndarray, labels: np.ndarray, split: str, where: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{where}: MNIST images must have shape [N, 28, 28], got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{where}: the MNIST {split} split is empty")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{where}: labels must lie in 0..9, found {int(labels.max())}")


def _load_npz(path: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_key, y_key = f"x_{split}", f"y_{split}"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (x_key, y_key) if k not in z.files]
            if missing:
                raise ValueError(
                    f"{path}: missing array(s) {missing}; an MNIST npz holds "
                    f"x_train, y_train, x_test, y_test (found {sorted(z.files)})"
                )
            images, labels = z[x_key], z[y_key]
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable npz file: {e}") from e
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {x_key} must be uint8, got {images.dtype}")
    labels = labels.astype(np.uint8) if np.issubdtype(labels.dtype, np.integer) else labels
    if labels.dtype != np.uint8:
        raise ValueError(f"{path}: {y_key} must hold integers, got {labels.dtype}")
    _check_split(images, labels, split, str(path))
    return images, labels


def _load_tfds(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        import tensorflow_datasets as tfds  # optional dependency: pip install .[tfds]
    except ImportError as e:
        raise ValueError(
            "MNIST source 'tfds' needs tensorflow-datasets (pip install 'collapse-jax[tfds]'); "
            "or point the source at a folder of idx files / an mnist.npz"
        ) from e
    ds = tfds.as_numpy(
        tfds.load("mnist", split=split, batch_size=-1, data_dir=data_dir, download=True)
    )
    images = np.asarray(ds["image"], dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(ds["label"]).astype(np.uint8)
    _check_split(images, labels, split, f"tfds mnist/{split}")
    return images, labels
