"""Each XLA trick of `collapse_jax.jaxtools` and the samplers on and off, as ratios (issue 20).

Every row times the trick against the plain version of the same program, interleaved in one
process (both see the same load; this 2-core VM's absolute timings move 2x with load, the ratio
much less), and checks that both give the same bits. Rows:

- prng_impl: the generational loop's key derivation (fold_in per generation, split into 6, one
  of them read; 10^4 chains x 100 generations) through `jaxtools.prng` on threefry
  keys, through `jax.random` on keys of an "unrolled threefry" implementation registered with
  `jax.extend.random.define_prng_impl` (the same bits), and through `jax.random` on JAX's own
  threefry keys (a rolled loop per hash on CPU).
- materialize: with and without `prng.materialize`: 10^4 chain keys read by 200 generations
  each, and one hash of 2^22 counters read by two reductions (micro-programs: XLA duplicates
  the hash, which costs less here than the buffer would).
- materialize_in_loop: `gaussian.simulate`, exact and sample methods, with and without
  `prng.materialize` (each variant in a process of its own, alternating): where it matters.
- chi_square_compaction: `samplers.normal_and_chi_square` over 10^6 lanes (df 2 and 999),
  rejected lanes compacted (CPU) or finished in masked full-width rounds (other platforms).
- binomial_compaction: `samplers.binomial` over 10^6 lanes of mixed regimes, compacted blocks
  against masked full-width loops.
- box_muller: 2^22 normals from `normal_pair_of_bits` against inversion (`normal_of_bits`).

Usage: python benchmarks/bench_xla_tricks.py [--repeats 5] [--only prng_impl,materialize]
Writes benchmarks/results/xla_tricks-<platform>.json (rows not re-run are kept).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

from collapse_jax.jaxtools import prng
from collapse_jax.theory import gaussian, samplers

_U = jnp.uint32
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed in interleaved rounds after a first call each."""
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _ready(f, *args):
    """A thunk that runs the jitted `f` and blocks; also returns the first result for checks."""
    jf = jax.jit(f)
    out = jax.block_until_ready(jf(*args))
    return (lambda: jax.block_until_ready(jf(*args))), out


def _same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# --- an unrolled threefry as a JAX PRNG implementation (the define_prng_impl experiment) ------


def _counters(shape) -> tuple[jax.Array, jax.Array]:
    """JAX's partitionable counters for `shape`: (high, low) words of the linear index."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError("more than 2^32 counters")
    lo = jax.lax.iota(_U, size).reshape(shape)
    return jnp.zeros(shape, _U), lo


def _words(key) -> tuple[jax.Array, jax.Array]:
    # Static slices and a concatenate of unit axes (as `prng` does): XLA then folds a key's
    # words back into the hash that made it instead of materialising the key.
    return tuple(jax.lax.index_in_dim(key, i, 0, keepdims=False) for i in (0, 1))


def _key(a, b):
    a, b = (jax.lax.expand_dims(x, (x.ndim,)) for x in (a, b))
    return jax.lax.concatenate([a, b], a.ndim - 1)


def _split(key, shape):
    k = _words(key)
    size = int(np.prod(shape, dtype=np.int64))
    if size > 8:  # vectorised over the counters
        return _key(*prng.threefry2x32(*k, *_counters(shape)))
    # One hash per key, concatenated: XLA folds slice(concatenate) to the key read, so keys
    # never read are never hashed (a vectorised hash is computed for every counter).
    keys = [_key(*prng.threefry2x32(*k, _U(0), _U(i)))[None] for i in range(size)]
    return jax.lax.concatenate(keys, 0).reshape(*shape, 2)


def _fold_in(key, data):
    return _key(*prng.threefry2x32(*_words(key), _U(0), jnp.asarray(data, _U)))


def _random_bits(key, bit_width, shape):
    a, b = prng.threefry2x32(*_words(key), *_counters(shape))
    if bit_width == 64:
        return (a.astype(jnp.uint64) << jnp.uint64(32)) | b.astype(jnp.uint64)
    bits = a ^ b
    return bits if bit_width == 32 else bits.astype(jnp.dtype(f"uint{bit_width}"))


UNROLLED = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=jex_random.threefry_prng_impl.seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="threefry2x32_unrolled",
    tag="fru",
)


def _loop(derive, chain_keys, gens: int):
    """Per chain and generation: derive(key, g) -> a key; the sum of its words, scanned."""

    def chain(key):
        def step(acc, g):
            return acc + jnp.sum(jax.random.key_data(derive(key, g))), None

        return jax.lax.scan(step, _U(0), jnp.arange(gens, dtype=_U))[0]

    return jax.vmap(chain)(chain_keys)


def _via_prng(key, g):
    return prng.fold_in_split(key, g, 6)[2]


def _via_jax_random(key, g):
    return jax.random.split(jax.random.fold_in(key, g), 6)[2]


def bench_prng_impl(repeats: int) -> dict:
    chains, gens = 10_000, 100
    data = jax.random.key_data(jax.random.split(jax.random.key(0), chains))
    fry = jax.random.wrap_key_data(data, impl="threefry2x32")
    unrolled = jax.random.wrap_key_data(data, impl=UNROLLED)
    runs, outs = {}, {}
    runs["prng"], outs["prng"] = _ready(lambda k: _loop(_via_prng, k, gens), fry)
    runs["define_prng_impl"], outs["define_prng_impl"] = _ready(
        lambda k: _loop(_via_jax_random, k, gens), unrolled
    )
    runs["jax_random_threefry"], outs["jax_random_threefry"] = _ready(
        lambda k: _loop(_via_jax_random, k, gens), fry
    )
    med = _interleaved(runs, repeats)
    return dict(
        config=dict(chains=chains, generations=gens, derive="fold_in, split 6, read 1"),
        bits_equal=all(_same(outs["prng"], o) for o in outs.values()),
        median_s={k: round(v, 4) for k, v in med.items()},
        ratio_define_prng_impl_over_prng=round(med["define_prng_impl"] / med["prng"], 3),
        ratio_jax_random_threefry_over_prng=round(med["jax_random_threefry"] / med["prng"], 3),
    )


def bench_materialize(repeats: int) -> dict:
    """Two uses: per-chain keys read by every generation (a broadcast: the loop's use in
    `_block_noise`), and one hash read by two outputs (the pattern the HLO test pins)."""
    chains, gens = 10_000, 200
    base = jax.random.key(0)

    def broadcast(c, mat):
        keys = jax.vmap(lambda i: prng.fold_in(base, i))(c)  # [R] chain keys
        keys = prng.materialize(keys) if mat else keys
        k1, k2 = (jax.random.key_data(keys)[:, i, None] for i in (0, 1))
        a, b = prng.threefry2x32(k1, k2, _U(0), jnp.arange(gens, dtype=_U)[None, :])  # [R, G]
        return jnp.sum(a ^ b)

    def two(x, mat):
        h = prng.threefry2x32(_U(7), _U(9), _U(0), x)[0]
        h = prng.materialize(h) if mat else h
        return jnp.sum((h >> _U(9)).astype(jnp.float32)), jnp.sum(h * _U(5) + _U(1))

    row = {}
    cases = {
        "broadcast": (broadcast, jnp.arange(chains, dtype=_U)),
        "two_consumers": (two, jnp.arange(2**22, dtype=_U)),
    }
    for case, (f, x) in cases.items():
        runs, outs = {}, {}
        for name, mat in (("materialize", True), ("plain", False)):
            runs[name], outs[name] = _ready(functools.partial(f, mat=mat), x)
        med = _interleaved(runs, repeats)
        row[case] = dict(
            bits_equal=_same(outs["materialize"], outs["plain"]),
            median_s={k: round(v, 4) for k, v in med.items()},
            ratio_plain_over_materialize=round(med["plain"] / med["materialize"], 3),
        )
    return dict(config=dict(chains=chains, generations=gens, two_consumers_counters=2**22), **row)


def _simulate_worker(variant: str, method: str, repeats: int) -> None:
    """Child process of `bench_materialize_in_loop`: times `gaussian.simulate` with
    `prng.materialize` as it is ("on") or replaced by the identity ("off"), prints JSON."""
    if variant == "off":  # only this process: its programs are traced without the loop
        prng.materialize = lambda x: x
    key = jax.random.key(0)
    size = 1000 if method == "exact" else 100

    def run():
        sim = gaussian.simulate(key, chains=4000, generations=50, sample_size=size, method=method)
        return float(np.asarray(sim.cov).sum())

    check = run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(median_s=statistics.median(times), check=check)))


def bench_materialize_in_loop(repeats: int) -> dict:
    """`gaussian.simulate` (4000 chains x 50 generations; exact at M = 1000, sample at M = 100)
    with and without `prng.materialize`. Its compiled programs are cached per learner, so each
    variant runs in a process of its own, the two alternating (two rounds each)."""
    row = {}
    for method in ("exact", "sample"):
        times: dict = {"materialize": [], "plain": []}
        checks = set()
        for _ in range(2):
            for name, variant in (("materialize", "on"), ("plain", "off")):
                cmd = [sys.executable, __file__, "--worker", variant, method, str(repeats)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
                times[name].append(res["median_s"])
                checks.add(res["check"])
        med = {k: statistics.median(v) for k, v in times.items()}
        row[method] = dict(
            same_result=len(checks) == 1,
            median_s={k: round(v, 4) for k, v in med.items()},
            ratio_plain_over_materialize=round(med["plain"] / med["materialize"], 3),
        )
    return dict(config=dict(chains=4000, generations=50), **row)


def bench_chi_square_compaction(repeats: int) -> dict:
    lanes = 1_000_000
    keys = jax.random.split(jax.random.key(1), lanes)
    row = {}
    for df in (2.0, 999.0):
        dfs = jnp.full((lanes,), df, jnp.float32)
        runs, outs = {}, {}
        for name, compact in (("compacted", True), ("masked", False)):
            draw = functools.partial(samplers.normal_and_chi_square, packed=True, compact=compact)
            runs[name], outs[name] = _ready(jax.vmap(draw), keys, dfs)
        med = _interleaved(runs, repeats)
        row[f"df_{df:g}"] = dict(
            bits_equal=_same(outs["compacted"], outs["masked"]),
            median_s={k: round(v, 4) for k, v in med.items()},
            ratio_masked_over_compacted=round(med["masked"] / med["compacted"], 3),
        )
    return dict(config=dict(lanes=lanes), **row)


def bench_binomial_compaction(repeats: int) -> dict:
    lanes = 1_000_000
    rng = np.random.default_rng(0)
    n = jnp.asarray(rng.integers(0, 2000, lanes), jnp.int32)
    p = jnp.asarray(rng.random(lanes) ** 3, jnp.float32)
    runs, outs = {}, {}
    for name, compact in (("compacted", True), ("masked", False)):
        draw = functools.partial(samplers.binomial, compact=compact)
        runs[name], outs[name] = _ready(draw, jax.random.key(2), n, p)
    med = _interleaved(runs, repeats)
    return dict(
        config=dict(lanes=lanes, n="uniform 0..1999", p="U^3"),
        bits_equal=_same(outs["compacted"], outs["masked"]),
        median_s={k: round(v, 4) for k, v in med.items()},
        ratio_masked_over_compacted=round(med["masked"] / med["compacted"], 3),
    )


def bench_box_muller(repeats: int) -> dict:
    num = 2**22
    w = jax.random.bits(jax.random.key(3), (2, num // 2), _U)
    runs = {}
    runs["box_muller"], _ = _ready(
        lambda w: sum(jnp.sum(v) for v in samplers.normal_pair_of_bits(w[0], w[1])), w
    )
    runs["inversion"], _ = _ready(lambda w: jnp.sum(samplers.normal_of_bits(w)), w)
    med = _interleaved(runs, repeats)
    return dict(
        config=dict(normals=num),
        median_s={k: round(v, 4) for k, v in med.items()},
        ratio_inversion_over_box_muller=round(med["inversion"] / med["box_muller"], 3),
    )


BENCHES = {
    "prng_impl": bench_prng_impl,
    "materialize": bench_materialize,
    "materialize_in_loop": bench_materialize_in_loop,
    "chi_square_compaction": bench_chi_square_compaction,
    "binomial_compaction": bench_binomial_compaction,
    "box_muller": bench_box_muller,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        variant, method, repeats = args.worker
        return _simulate_worker(variant, method, int(repeats))
    platform = jax.default_backend()
    out = RESULTS / f"xla_tricks-{platform}.json"
    rows = json.loads(out.read_text()) if out.exists() else {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        row = BENCHES[name](args.repeats)
        row.update(
            device=str(jax.devices()[0].device_kind),
            jax=jax.__version__,
            load_average_1_5_15=[round(v, 2) for v in os.getloadavg()],
            wall_s=round(time.perf_counter() - t0, 1),
        )
        rows[name] = row
        print(name, json.dumps(row))
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
