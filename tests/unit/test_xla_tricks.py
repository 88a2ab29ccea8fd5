"""The XLA behaviour each trick in `collapse_jax.jaxtools` relies on, read from compiled programs.

Each test compiles a small program on this CPU and reads the optimised HLO
(`jax.jit(f).lower(...).compile().as_text()`), or exports it for CUDA and TPU (`jax.export`,
which lowers for those platforms on this machine). A test fails when the property the trick
exists for is gone: the trick is then broken, or, where the test also checks the plain version
(the control), an XLA / JAX upgrade has made the trick unnecessary; either way someone should
look. Nothing here is timed.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from collapse_jax.config import MeshConfig
from collapse_jax.gmm import em
from collapse_jax.gmm.em import GMMParams
from collapse_jax.jaxtools import convs, prng, sharding
from collapse_jax.theory import discrete, gaussian, samplers

_U = jnp.uint32
ACCELERATORS = ("cuda", "tpu")


def _compiled(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def _exported(f, platform: str, *args) -> str:
    return export.export(jax.jit(f), platforms=(platform,))(*args).mlir_module()


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def _xors(hlo: str) -> int:
    """xor instructions of a compiled HLO module (a threefry hash is ~20 of them)."""
    return _count(r"\bxor\(", hlo)


def _whiles(hlo: str) -> int:
    return _count(r"\bwhile\(", hlo)


def _hash(x):
    return prng.threefry2x32(_U(7), _U(9), _U(0), x)[0]


def _two_consumers(x, materialize: bool):
    """One hash read by two outputs: XLA:CPU fuses a cheap producer into each consumer."""
    h = prng.materialize(_hash(x)) if materialize else _hash(x)
    return (h >> _U(3)).astype(jnp.float32), h * _U(5) + _U(1)


WORDS = jnp.arange(4096, dtype=_U)


def test_materialize_computes_the_hash_once_on_cpu():
    one_hash = _xors(_compiled(lambda x: _hash(x) * _U(5), WORDS))
    assert one_hash >= 16, "the threefry hash no longer compiles to its xor rounds"
    plain = _compiled(functools.partial(_two_consumers, materialize=False), WORDS)
    done = _compiled(functools.partial(_two_consumers, materialize=True), WORDS)
    # The trick: the once-run loop survives optimisation and the hash is evaluated once.
    assert _whiles(done) == 1, "XLA removed materialize's loop: the hash is recomputed again"
    assert _xors(done) == one_hash, "the hash is computed more than once despite materialize"
    # The control: without it, XLA:CPU evaluates the hash in both consumers.
    assert _xors(plain) == 2 * one_hash, (
        "XLA:CPU no longer duplicates the hash into each consumer: prng.materialize may be "
        "unnecessary now (measure, then remove it)"
    )


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_materialize_is_the_identity_on_accelerators(platform):
    f = functools.partial(_two_consumers, materialize=True)
    assert "stablehlo.while" in _exported(f, "cpu", WORDS)
    assert "stablehlo.while" not in _exported(f, platform, WORDS)


def test_materialize_returns_32_bit_floats_and_ints_bit_for_bit():
    """The bitcast path: float32 (NaN payloads, -0, inf, denormals) and int32 come back with
    their exact bits, jitted, vmapped and eagerly, alongside keys of two implementations."""
    bits = np.array([0x7FC00001, 0x80000000, 0x7F800000, 0x00000001, 0x3F800000], np.uint32)
    floats = jnp.asarray(bits.view(np.float32))
    ints = jnp.asarray([-(2**31), -1, 0, 7, 2**31 - 1], jnp.int32)
    keys = jax.random.split(jax.random.key(3), 5)
    philox = jax.random.key(4, impl="philox4x32")
    tree = {"f": floats, "i": ints, "k": keys, "p": philox}
    for run in (prng.materialize, jax.jit(prng.materialize)):
        out = run(tree)
        assert out["f"].dtype == jnp.float32 and out["i"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out["f"]).view(np.uint32), bits)
        np.testing.assert_array_equal(out["i"], ints)
        np.testing.assert_array_equal(jax.random.key_data(out["k"]), jax.random.key_data(keys))
        assert str(jax.random.key_impl(out["p"])) == "philox4x32"
        np.testing.assert_array_equal(jax.random.key_data(out["p"]), jax.random.key_data(philox))
    got = jax.jit(jax.vmap(prng.materialize))(floats)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), bits)
    assert prng.materialize([]) == []


def test_unrolled_threefry_has_no_loop_and_unused_keys_cost_nothing():
    """`prng.fold_in` / `split` / `fold_in_split` compile without a loop, and only the keys
    read are hashed; the control is JAX's own CPU lowering, a rolled loop per hash."""
    key = jax.random.key(0)
    chains = jnp.arange(64, dtype=_U)

    def data(k):
        return jax.random.key_data(k)

    ours = _compiled(jax.vmap(lambda c: data(prng.fold_in(key, c))), chains)
    assert _whiles(ours) == 0, "prng.fold_in compiles to a loop"
    one_hash = _xors(ours)
    # fold_in, then one key of six: two hashes (a third of the seven a stacked split costs)
    third = _compiled(jax.vmap(lambda c: data(prng.split(prng.fold_in(key, c), 6)[2])), chains)
    assert _whiles(third) == 0 and _xors(third) < 3 * one_hash
    both = _compiled(jax.vmap(lambda c: data(prng.fold_in_split(key, c, 6)[4])), chains)
    assert _whiles(both) == 0 and _xors(both) < 3 * one_hash
    theirs = _compiled(jax.vmap(lambda c: data(jax.random.fold_in(key, c))), chains)
    assert _whiles(theirs) >= 1, (
        "jax.random's threefry no longer lowers to a rolled loop on CPU: prng's unrolled "
        "derivation may be unnecessary now (measure, then remove it)"
    )


LANES = 5000


def _chi_square_lanes(row: int, rows: int, compact: bool | None = None):
    draw = functools.partial(
        samplers.normal_and_chi_square, packed=True, row=row, rows=rows, compact=compact
    )
    return jax.vmap(draw), (jax.random.split(jax.random.key(0), LANES), jnp.full(LANES, 2.0))


def test_chi_square_compaction_runs_the_rejected_lanes_on_gathered_rows():
    """`_mt_finish` on CPU: the rejected lanes' rounds run on up to `rows` gathered rows of
    `row` lanes (a loop over [rows, row] tiles), not at full width; other platforms (and
    `compact=False`) run the masked full-width loop, with no gather or scatter."""
    f, args = _chi_square_lanes(row=48, rows=24)
    tile = r"c64\[24,48\]"
    assert _count(tile, _compiled(f, *args)) > 0, "no loop over gathered [rows, row] tiles"
    for platform in ACCELERATORS:
        text = _exported(f, platform, *args)
        assert "24x48xcomplex" not in text and "scatter" not in text
    g, _ = _chi_square_lanes(row=48, rows=24, compact=False)
    assert _count(tile, _compiled(g, *args)) == 0


def test_binomial_compaction_runs_each_regime_in_its_own_blocks():
    """`_binomial_lanes` on CPU: the inversion lanes and the BTRS lanes still rejected after
    the full-width rounds run in blocks of `inversion_block` / `retry_block` gathered lanes;
    other platforms run those loops masked at full width (no gather, no scatter)."""
    n = jnp.arange(LANES, dtype=jnp.int32) % 300
    p = jnp.full((LANES,), 0.03, jnp.float32)
    f = functools.partial(samplers.binomial, inversion_block=384, retry_block=48)
    args = (jax.random.key(1), n, p)
    cpu = _compiled(f, *args)
    assert _count(r"s32\[384\]", cpu) > 0 and _count(r"s32\[48\]", cpu) > 0
    for platform in ACCELERATORS:
        text = _exported(f, platform, *args)
        assert "tensor<384x" not in text and "tensor<48x" not in text
        assert "gather" not in text and "scatter" not in text


def test_factor_keeps_its_batch_wide_cond():
    """`gaussian.robust_cholesky` (a whole-batch function): vmapped over chains, the batch-wide
    `cond` that skips `psd_cholesky` when no matrix needs it survives compilation; a plain vmap
    of the same per-batch function turns it into a select that computes both (the control)."""
    a = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (10, 3, 3))
    assert _count(r"\bconditional\(", _compiled(jax.vmap(gaussian.robust_cholesky), a)) == 1
    plain = jax.vmap(lambda m: gaussian.robust_cholesky_lanes(m[None])[0])
    assert _count(r"\bconditional\(", _compiled(plain, a)) == 0


def test_under_a_mesh_the_theory_samplers_do_not_compact():
    """With a `mesh:` the chains are sharded over devices, so the exact samplers' lanes run
    masked at full width instead of compacted across every chain (a gather from all
    devices): the same draws, and no gathered tiles in the compiled program."""
    keys = jax.random.split(jax.random.key(2), LANES)
    num = jnp.full((LANES,), 3, jnp.int32)
    mesh = MeshConfig(data=-1)
    g_cfg = gaussian.GaussianConfig(dim=1, method="exact")
    g_plain, g_mesh = gaussian.GaussianLearner(g_cfg), gaussian.GaussianLearner(g_cfg, mesh)
    d_cfg = discrete.DiscreteConfig(family="explicit", probs=(0.5, 0.3, 0.2), method="exact")
    d_plain, d_mesh = discrete.DiscreteLearner(d_cfg), discrete.DiscreteLearner(d_cfg, mesh)
    for plain, meshed, draw in (
        (g_plain, g_mesh, lambda lrn: jax.vmap(lrn.sample_noise)),
        (d_plain, d_mesh, lambda lrn: jax.vmap(lambda k, n: lrn.sample(k, lrn.truth, n))),
    ):
        compacted = jax.jit(draw(plain)).lower(keys, num).compile()
        masked = jax.jit(draw(meshed)).lower(keys, num).compile()
        np.testing.assert_array_equal(masked(keys, num), compacted(keys, num))
        assert _count(r"\bscatter\(", compacted.as_text()) > 0
        assert _count(r"\bscatter\(", masked.as_text()) == 0


def _em_batch(chains: int = 32) -> tuple[jax.Array, GMMParams]:
    """`chains` two-cluster data sets [chains, 40, 2] and one shared EM start."""
    rng = np.random.default_rng(3)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0]], np.float32)
    x = centres[rng.integers(0, 2, (chains, 40))] + rng.normal(size=(chains, 40, 2))
    init = GMMParams(
        jnp.full((2,), 0.5), jnp.asarray(centres * 0.5), jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
    )
    return jnp.asarray(x, jnp.float32), init


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_gmm_compaction_is_not_in_the_accelerator_program(platform):
    """`gmm.fit_em`'s compaction of converged chains is host-driven rounds, on one CPU device
    only (`em.compacts`): the program a jitted fit exports for CUDA / TPU is the plain vmapped
    loop, one while loop over every chain with no gather or scatter of chains."""
    x, init = _em_batch()
    text = _exported(lambda x: em.fit_em(x, n_components=2, init=init).params, platform, x)
    assert _count(r"stablehlo\.while", text) == 1
    assert "gather" not in text and "scatter" not in text


def test_gmm_compacts_on_one_cpu_device_only():
    """Concrete chains on one CPU device run in compacted rounds; chains sharded over a mesh's
    devices run as one full-width loop (no gather across devices), traced chains too. The
    sharded run gives the same fits up to float32 rounding (the batch size changes XLA's
    reductions), and the same iteration counts but for a chain whose last change of the
    lower bound lies within rounding of `tol` (one iteration apart: its fit then differs by
    that iteration's small step, so only the chains of equal counts are compared)."""
    x, init = _em_batch()
    assert em.compacts(x) and not em.compacts(x, compact=False)
    assert not em.compacts(x[:31])  # too few chains to pay (fewer than two smallest rounds)
    sharded = jax.device_put(x, sharding.batch_sharding(sharding.make_mesh(MeshConfig())))
    assert len(sharded.sharding.device_set) == 8 and not em.compacts(sharded)
    assert em.compacts(sharded, compact=True)
    seen = []
    jax.jit(lambda x: seen.append(em.compacts(x)) or x).lower(x)
    assert seen == [False]
    one = em.fit_em(x, n_components=2, init=init, max_iter=200)
    spread = em.fit_em(sharded, n_components=2, init=init, max_iter=200)
    n_one, n_spread = np.asarray(one.n_iter), np.asarray(spread.n_iter)
    same = n_one == n_spread
    assert np.abs(n_spread - n_one).max() <= 1 and same.mean() > 0.8
    for a, b in zip(spread.params, one.params):
        np.testing.assert_allclose(np.asarray(a)[same], np.asarray(b)[same], rtol=1e-4, atol=1e-4)


def _conv_layers(x, k, kt, method=None):
    """A strided convolution to 32 channels and a transposed one back to one (the VAE's first
    and last layers' shapes): the thin layer takes the patch-matmul paths on CPU."""
    h = convs.conv(x, k, (2, 2), ((1, 1), (1, 1)), method=method)
    y = convs.conv_transpose(h, kt, (2, 2), ((2, 2), (2, 2)), method=method)
    return jnp.sum(y * y)


_CONV_ARGS = (
    jax.ShapeDtypeStruct((8, 28, 28, 1), jnp.float32),
    jax.ShapeDtypeStruct((4, 4, 1, 32), jnp.float32),
    jax.ShapeDtypeStruct((4, 4, 32, 1), jnp.float32),
)


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_convs_choose_their_path_per_platform_inside_the_program(platform):
    """`convs` decides inside the traced program: exported from this CPU, the CPU program holds
    the custom gradients (patch and col2im matmuls of the thin layer), the CUDA/TPU program only
    XLA's convolutions and JAX's own gradients."""
    grads = jax.grad(_conv_layers, argnums=(0, 1, 2))
    cpu = _exported(grads, "cpu", *_CONV_ARGS)
    acc = _exported(grads, platform, *_CONV_ARGS)
    assert "stablehlo.dot_general" in cpu
    assert "stablehlo.dot_general" not in acc
    assert _count(r"stablehlo\.convolution", acc) == 6  # 2 forward, 2 x 2 gradients
