"""Transition survival under recursive refitting of the exact count learner (Suresh et al. 2024,
"Rate of model collapse in recursive training") on the known language.

The learner is the bigram maximum-likelihood table (`lm.tables.fit_counts` with alpha = 0: each
row the context's transition counts, normalised; the first token from the token counts of whole
blocks; a context never seen followed by a token gets the uniform row). Each generation samples
as many blocks as it was fitted on from the table and refits it. A true transition (a, b) is
alive at generation k while its count in generation k's data is positive; once lost it never
returns (its table entry is 0).

The rate. One generation later, the count of (a, b) is a sum over the N'_a visits to context a
of independent draws that each pick b with probability c / N_a, so given N'_a it is
Binomial(N'_a, c / N_a), with mean c when the context's count holds (E N'_a ~ N_a). For small
c / N_a this is Poisson(c): every occurrence leaves Poisson(1) descendants, a critical
Galton-Watson process. Starting from one occurrence, survival after k generations is
q_k = P(Z_k > 0) with q_0 = 1, q_{k+1} = 1 - exp(-q_k) (the Poisson(1) generating function
f(s) = exp(s - 1) gives P(Z_{k+1} = 0) = f(P(Z_k = 0))), so q_k ~ 2 / k (Kolmogorov:
2 / (sigma^2 k), sigma^2 = 1); occurrences die independently, hence
S_k(c) = 1 - (1 - q_k)^c  (about 2c / k once k >> c): a transition seen c times survives
about c times as long as one seen once, and every finite count is lost eventually.

Exact for a single category of an i.i.d. multinomial resampling of n points (Wright-Fisher):
the count is the Markov chain X' ~ Binomial(n, X / n), and S_k(c) = P(X_k > 0 | X_0 = c) is a
matrix power (`wright_fisher_survival`), which tends to the Galton-Watson form as n grows.
tests/unit/lm/test_survival.py checks both against Monte Carlo at 10^4 chains.

`python -m collapse_jax.lm.survival OUT.png` runs the count learner on the known language
(`lm/truth_markov_*`'s source: V = 64, support 16, Zipf a = 1, 256 real blocks of 64 tokens)
over vmapped chains and draws each true transition's survival against its original count.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.lm import source as source_lib


def galton_watson_survival(counts: np.ndarray, generations: int) -> np.ndarray:
    """S_k(c) = 1 - (1 - q_k)^c for k = 0..generations-1: [generations, len(counts)]."""
    q = np.empty(generations)
    q[0] = 1.0
    for k in range(1, generations):
        q[k] = -np.expm1(-q[k - 1])
    c = np.asarray(counts, np.float64)
    return 1.0 - np.power(1.0 - q[:, None], c[None, :])


def wright_fisher_survival(n: int, counts: Sequence[int], generations: int) -> np.ndarray:
    """P(X_k > 0 | X_0 = c) for X' ~ Binomial(n, X / n), k = 0..generations-1 (exact):
    [generations, len(counts)]."""
    from scipy import stats

    x = np.arange(n + 1)
    trans = stats.binom.pmf(x[None, :], n, x[:, None] / n)  # [from, to]
    dist = np.zeros((len(counts), n + 1))
    dist[np.arange(len(counts)), np.asarray(counts)] = 1.0
    out = np.empty((generations, len(counts)))
    for k in range(generations):
        out[k] = 1.0 - dist[:, 0]
        dist = dist @ trans
    return out


def bigram_counts(blocks: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(transition counts [V, V] of consecutive pairs, token counts [V] of whole blocks)."""
    v = vocab_size
    prev, nxt = blocks[:, :-1].reshape(-1), blocks[:, 1:].reshape(-1)
    pairs = jnp.zeros((v * v,), jnp.int32).at[prev * v + nxt].add(1).reshape(v, v)
    tokens = jnp.zeros((v,), jnp.int32).at[blocks.reshape(-1)].add(1)
    return pairs, tokens


def sample_table(key: jax.Array, pairs: jax.Array, tokens: jax.Array, shape) -> jax.Array:
    """Blocks [n, length] sampled from the maximum-likelihood bigram table of the counts."""
    n, length = shape
    v = tokens.shape[0]
    total = pairs.sum(-1, keepdims=True)
    rows = jnp.where(total > 0, pairs / jnp.maximum(total, 1), 1.0 / v)
    logits = jnp.log(rows.astype(jnp.float32))
    k0, k_rest = jax.random.split(key)
    first = jax.random.categorical(k0, jnp.log(tokens.astype(jnp.float32)), shape=(n,))

    def step(tok, k):
        nxt = jax.random.categorical(k, logits[tok])
        return nxt, nxt

    _, rest = jax.lax.scan(step, first, jax.random.split(k_rest, length - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _chains(keys, real_pairs, generations: int, shape):
    """Alive masks [chains, generations, V, V] of the recursion from the real counts."""

    def chain(key, real_tokens_pairs):
        pairs0, tokens0 = real_tokens_pairs

        def gen(carry, k):
            pairs, tokens = carry
            blocks = sample_table(k, pairs, tokens, shape)
            new = bigram_counts(blocks, tokens.shape[0])
            return new, new[0] > 0

        _, alive = jax.lax.scan(gen, (pairs0, tokens0), jax.random.split(key, generations - 1))
        return jnp.concatenate([(pairs0 > 0)[None], alive], axis=0)

    return jax.vmap(chain, in_axes=(0, None))(keys, real_pairs)


def survival_by_count(
    key: jax.Array,
    source_config: source_lib.SourceConfig,
    *,
    num_blocks: int = 256,
    block_len: int = 64,
    generations: int = 10,
    chains: int = 100,
) -> dict[str, np.ndarray]:
    """The count learner's recursion on the known language: the real blocks (one draw, shared
    by the chains), then `chains` independent chains of `generations` - 1 refits.

    Returns {"count": [P] original count of each true transition seen in the real data,
    "alive": [generations, P] share of chains in which it is alive, "unseen": number of true
    transitions absent from the real data}."""
    src = source_lib.build_source(source_config)
    k_real, k_chains = jax.random.split(key)
    real = src.sample(k_real, num_blocks, block_len)
    pairs, tokens = bigram_counts(real, src.vocab_size)
    _, ctx, tok, _ = src.transitions()
    c = np.asarray(pairs)[ctx, tok]
    alive = _chains(
        jax.random.split(k_chains, chains), (pairs, tokens), generations, (num_blocks, block_len)
    )
    share = np.asarray(alive, np.float64).mean(0)[:, ctx, tok]  # [G, all true transitions]
    seen = c > 0
    return {"count": c[seen], "alive": share[:, seen], "unseen": int((~seen).sum())}


def survival_figure(
    path: pathlib.Path, *, chains: int = 100, generations: int = 10, seed: int = 0
) -> dict[str, list]:
    """Left: survival over generations of the true transitions grouped by original count, Monte
    Carlo (chain means) against S_k(c) averaged over each group. Right: survival at the last
    generation of every transition against its count (log x), with S_k(c). Returns the numbers
    drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = source_lib.SourceConfig(kind="markov", vocab_size=64, order=1, support=16, zipf_a=1.0)
    res = survival_by_count(jax.random.key(seed), cfg, generations=generations, chains=chains)
    c, alive = res["count"], res["alive"]
    theory = galton_watson_survival(c, generations)
    groups = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 64), (65, 10**9)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    k = np.arange(generations)
    numbers: dict[str, list] = {}
    for i, (lo, hi) in enumerate(groups):
        sel = (c >= lo) & (c <= hi)
        if not sel.any():
            continue
        name = f"c = {lo}" if lo == hi else (f"c >= {lo}" if hi > 10**8 else f"c = {lo}-{hi}")
        mc, th = alive[:, sel].mean(1), theory[:, sel].mean(1)
        ax.plot(k, th, "-", color=f"C{i}", lw=1.2)
        ax.plot(k, mc, "o", color=f"C{i}", ms=4, label=f"{name} ({sel.sum()} transitions)")
        numbers[name] = [np.round(mc, 4).tolist(), np.round(th, 4).tolist()]
    ax.set_xlabel("generation k (0 = the real data)")
    ax.set_ylabel("share of true transitions still present")
    ax.set_title(f"Bigram count learner on the known language, {chains} chains\n"
                 "dots: Monte Carlo; lines: 1 - (1 - q_k)^c, q_{k+1} = 1 - exp(-q_k)",
                 fontsize=10)  # fmt: skip
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    last = generations - 1
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, c.size)
    bx.scatter(c * np.exp(jitter * 0.5), alive[last], s=6, alpha=0.5, label="each true transition")
    grid = np.unique(np.round(np.logspace(0, np.log10(c.max()), 200)))
    q_last = float(galton_watson_survival(np.array([1]), generations)[last, 0])
    bx.plot(grid, galton_watson_survival(grid, generations)[last], "k-", lw=1.5,
            label=f"1 - (1 - q_{last})^c, q_{last} = {q_last:.3f}")  # fmt: skip
    bx.set_xscale("log")
    bx.set_xlabel("count c of the transition in the real data (256 blocks of 64 tokens)")
    bx.set_ylabel(f"share of chains in which it survives {last} refits")
    bx.set_title(f"Survival after {last} generations against the original count\n"
                 f"({res['unseen']} true transitions unseen in the real data, lost at once)",
                 fontsize=10)  # fmt: skip
    bx.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    numbers["unseen"] = [res["unseen"]]
    return numbers


if __name__ == "__main__":
    import sys

    for name_, value in survival_figure(pathlib.Path(sys.argv[1])).items():
        print(name_, value)
