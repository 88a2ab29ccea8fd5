"""MNIST loading from idx (plain / gz) and npz files, with validation errors naming the file."""

import gzip

import numpy as np
import pytest

from collapse_jax.vae import mnist


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dir(folder, n=5, gz=False):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, arr in (("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        raw = _idx(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return x, y


def test_real_copy(data_dir):
    x, y = mnist.load_mnist(data_dir / "mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    assert list(y[:5]) == [5, 0, 4, 1, 9] and x.max() == 255
    xt, yt = mnist.load_mnist(data_dir / "mnist", "test")
    assert xt.shape == (10000, 28, 28) and list(yt[:3]) == [7, 2, 1]
    f = mnist.as_float(xt[:2])
    assert f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1


@pytest.mark.parametrize("gz", [False, True])
def test_idx_plain_and_gz(tmp_path, gz):
    x, y = _write_idx_dir(tmp_path, gz=gz)
    gx, gy = mnist.load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)


def test_npz(tmp_path):
    x = np.zeros((3, 28, 28), np.uint8)
    y = np.array([1, 2, 3], np.int64)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
    gx, gy = mnist.load_mnist(tmp_path / "mnist.npz", "train")
    assert gx.shape == (3, 28, 28) and gy.dtype == np.uint8 and list(gy) == [1, 2, 3]
    assert mnist.load_mnist(tmp_path, "test")[0].shape == (1, 28, 28)  # folder holding it
    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(ValueError, match="bad.npz.*y_train"):
        mnist.load_mnist(tmp_path / "bad.npz", "train")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="split"):
        mnist.load_mnist(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="not found"):
        mnist.load_mnist(tmp_path / "nowhere", "test")
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        mnist.load_mnist(tmp_path, "test")
    _write_idx_dir(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[:-7])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: payload"):
        mnist.load_mnist(tmp_path, "test")
    images.write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="magic"):
        mnist.load_mnist(tmp_path, "test")
    images.write_bytes(_idx(np.zeros((4, 28, 28), np.uint8)))  # 4 images, 5 labels
    with pytest.raises(ValueError, match="labels"):
        mnist.load_mnist(tmp_path, "test")


def test_tfds_missing_is_a_clear_error():
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tensorflow-datasets"):
            mnist.load_mnist("tfds", "test")
    else:
        pytest.skip("tensorflow-datasets is installed")
