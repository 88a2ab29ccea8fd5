"""The CPU matmul convolution equals XLA's convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax import convs


@pytest.mark.parametrize(
    "shape,kshape", [((2, 9, 8, 3), (3, 3, 3, 5)), ((3, 15, 15, 4), (2, 2, 4, 7))]
)
def test_matmul_conv_matches_lax(shape, kshape):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kk, kshape)
    ref = convs.conv2d_valid(x, k, method="lax")
    got = convs.conv2d_valid(x, k, method="matmul")
    assert (
        got.shape
        == ref.shape
        == (shape[0], shape[1] - kshape[0] + 1, shape[2] - kshape[1] + 1, kshape[3])
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    def loss(method):
        return lambda x, k: jnp.sum(jnp.sin(convs.conv2d_valid(x, k, method=method)))

    g_ref = jax.grad(loss("lax"), argnums=(0, 1))(x, k)
    g_got = jax.jit(jax.grad(loss("matmul"), argnums=(0, 1)))(x, k)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_impl_choice(monkeypatch):
    monkeypatch.setattr(convs, "IMPL", "auto")
    assert convs.impl() == ("matmul" if jax.default_backend() == "cpu" else "lax")
    monkeypatch.setattr(convs, "IMPL", "lax")
    assert convs.impl() == "lax"
    monkeypatch.setattr(convs, "IMPL", "fast")
    with pytest.raises(ValueError, match="COLLAPSE_JAX_CONV"):
        convs.impl()
