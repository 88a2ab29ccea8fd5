"""The CPU convolutions (custom gradients, patch matmuls for thin layers) equal XLA's
convolutions with JAX's own gradients: values and both gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.jaxtools import convs

# (x shape, kernel shape, strides, padding). Thin layers (one channel, more taps' worth of
# channels on the other side) take the patch-matmul paths, as the VAE's first and last layers:
# case 0 the conv's kernel gradient, case 1 the transposed conv and its kernel gradient; case 2
# is wide (lax everywhere, the VAE's middle layers); case 3 has uneven strides and a padding
# that turns negative in the transposed conv's gradient.
CASES = [
    ((2, 8, 8, 1), (4, 4, 1, 20), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 5, 20), (4, 4, 20, 1), (2, 2), ((2, 2), (2, 2))),
    ((2, 6, 7, 8), (4, 4, 8, 5), (2, 2), ((1, 1), (1, 1))),
    ((2, 6, 5, 3), (3, 2, 3, 4), (3, 2), ((1, 2), (0, 3))),
]


@pytest.mark.parametrize("shape,kshape,strides,padding", CASES)
def test_cpu_convs_match_lax(shape, kshape, strides, padding):
    rng = np.random.default_rng(0)  # NumPy draws: no compiles
    x, k = rng.normal(size=shape).astype(np.float32), rng.normal(size=kshape).astype(np.float32)
    y_conv, y_t = jax.eval_shape(
        lambda: (
            convs.conv(x, k, strides, padding, "lax"),
            convs.conv_transpose(x, k, strides, padding, "lax"),
        )
    )
    c_conv = rng.normal(size=y_conv.shape).astype(np.float32)
    c_t = rng.normal(size=y_t.shape).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=2)
    def values_and_grads(x, k, method):
        """Both ops' values and gradients against random cotangents (so every output counts)."""

        def loss(x, k):
            y1 = convs.conv(x, k, strides, padding, method)
            y2 = convs.conv_transpose(x, k, strides, padding, method)
            return jnp.sum(c_conv * jnp.sin(y1)) + jnp.sum(c_t * jnp.sin(y2)), (y1, y2)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, k)

    (gx, gk), ys = values_and_grads(x, k, "cpu")
    (rx, rk), refs = values_and_grads(x, k, "lax")
    for a, b in zip(ys, refs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gk, rk, rtol=1e-4, atol=1e-4)


def test_impl_choice(monkeypatch):
    monkeypatch.setattr(convs, "IMPL", "auto")
    assert convs.impl() == ("cpu" if jax.default_backend() == "cpu" else "lax")
    assert convs.impl("cpu") == "cpu" and convs.impl("cuda") == convs.impl("tpu") == "lax"
    monkeypatch.setattr(convs, "IMPL", "lax")
    assert convs.impl() == "lax"
    monkeypatch.setattr(convs, "IMPL", "fast")
    with pytest.raises(ValueError, match="COLLAPSE_JAX_CONV"):
        convs.impl()
    with pytest.raises(ValueError, match="COLLAPSE_JAX_CONV"):
        convs.conv(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)))


def test_auto_is_the_cpu_path_bit_for_bit_on_this_backend():
    """The per-platform choice inside the program changes nothing on the platform it runs on:
    values and both gradients equal those of the path `impl()` names, bit for bit."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.random((4, 28, 28, 1), np.float32))
    k = jnp.asarray(rng.normal(size=(4, 4, 1, 8)).astype(np.float32))
    kt = jnp.asarray(rng.normal(size=(4, 4, 8, 1)).astype(np.float32))

    def loss(x, k, kt, method):
        h = convs.conv(x, k, (2, 2), ((1, 1), (1, 1)), method=method)
        return jnp.sum(convs.conv_transpose(h, kt, (2, 2), ((2, 2), (2, 2)), method=method) ** 2)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    auto, forced = f(x, k, kt, "auto"), f(x, k, kt, convs.impl())
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(forced)):
        np.testing.assert_array_equal(a, b)
