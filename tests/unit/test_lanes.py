"""`jaxtools.lanes.whole_batch`: the function sees every lane of every vmap level at once, and a
batched call equals a loop over single calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_jax.jaxtools import lanes

seen: list[tuple[int, ...]] = []


@lanes.whole_batch
def _scaled(x, w, *, power=1):
    """Element-wise; records the shape it runs on (at trace time)."""
    seen.append(x.shape)
    return x * w**power + jnp.sum(x) * 0  # a batch-wide reduction that must not leak


@lanes.whole_batch(core_ndims=(2, 0))
def _trace_plus(m, c):
    seen.append(m.shape)
    return jnp.trace(m, axis1=1, axis2=2) + c


def test_flat_and_nested_vmaps_run_one_call_over_every_lane():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    w = jnp.arange(4.0)  # unbatched, broadcast within a lane
    seen.clear()
    direct = _scaled(x, w, power=2)
    assert seen == [(24,)]
    np.testing.assert_array_equal(direct, x * (w**2)[None, None])
    seen.clear()
    nested = jax.jit(jax.vmap(jax.vmap(lambda a: _scaled(a, w, power=2))))(x)
    assert seen[-1] == (24,), seen  # the outermost call sees 2 x 3 x 4 lanes
    np.testing.assert_array_equal(nested, direct)
    # batched in the other argument only, and over an inner axis (in_axes=1)
    got = jax.vmap(lambda v: _scaled(x[0, 0], v), in_axes=1)(jnp.stack([w, w + 1], 1))
    np.testing.assert_array_equal(got, jnp.stack([x[0, 0] * w, x[0, 0] * (w + 1)]))


def test_core_axes_and_unbatched_calls():
    m = jnp.arange(5 * 2 * 2.0).reshape(5, 2, 2)
    c = jnp.float32(1.0)
    seen.clear()
    got = jax.vmap(_trace_plus, (0, None))(m, c)
    assert seen[-1] == (5, 2, 2)
    np.testing.assert_array_equal(got, jnp.trace(m, axis1=1, axis2=2) + 1)
    np.testing.assert_array_equal(_trace_plus(m[1], c), got[1])  # a scalar lane shape
    # vmapped over the scalar only: the matrix is broadcast to every lane
    got = jax.vmap(_trace_plus, (None, 0))(m[2], jnp.arange(3.0))
    np.testing.assert_array_equal(got, jnp.trace(m[2]) + jnp.arange(3.0))


def test_empty_batch_and_bad_arity():
    out = _scaled(jnp.zeros((0, 3)), jnp.ones(3))
    assert out.shape == (0, 3) and out.dtype == jnp.float32
    with pytest.raises(TypeError, match="takes 2 arrays, got 1"):
        _trace_plus(jnp.eye(2))
