"""Ground-truth languages: stochastic sources whose every conditional is known exactly.

The paper (Shumailov et al. 2024) can measure its language-model collapse only indirectly, because
nobody knows WikiText's distribution. Here the "real" text is drawn from a known source, so the
true conditional p(x_t | x_<t) of every context is available and collapse is measured exactly
(`collapse_jax.lm.truth`). Two sources over their own vocabulary {0, ..., V-1}:

- `MarkovSource`: a sparse Zipfian Markov chain of order k (1 or 2). Every context (the last k
  tokens) has a random support of s tokens carrying Zipf(a) weights (rank r gets r^-a) in a random
  order, so most of the mass sits on a few continuations and a long tail holds the rest. One
  support token of every context is the successor of the context's last token on a random cycle
  through the vocabulary: this makes the chain irreducible, so its stationary distribution is
  unique, and the entropy rate is exact: H = sum_c pi(c) H(P(.|c)).
- `HMMSource`: a hidden Markov model with H hidden states, sparse Zipfian transitions (again with
  a random cycle, for irreducibility) and Zipfian emissions of s tokens per state. Its
  conditionals come from the forward recursion in log space; its entropy rate has no closed form
  and is a Monte Carlo estimate with its standard error (see `HMMSource`).

A block of text is a window of the stationary process: the first tokens are drawn from the
stationary distribution, so every position of a block has the same law wherever the block was
cut from an endless text (as WikiText's 64-token blocks are). All sampling is exact (inverse CDF),
batched and jitted. A source is a deterministic function of its `SourceConfig` (`build_source`);
`save_source` / `load_source` keep it in a run directory and check that a rebuild is identical.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import pathlib
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax import config as config_lib
from collapse_jax.lm.data import LMCorpus
from collapse_jax.rundir import fileio


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    """A ground-truth language, rebuilt deterministically from these fields.

    Attributes:
      kind: "markov" (sparse Zipfian Markov chain) or "hmm" (hidden Markov model).
      vocab_size: V, the source's own vocabulary size.
      order: k, the Markov chain's order (1 or 2; markov only).
      support: s, continuations per context (markov) or tokens emitted per hidden state (hmm).
      zipf_a: a, the Zipf exponent of the weights over the support (rank r gets r^-a).
      support_min: heterogeneous supports (markov only): each context keeps a random number of
        continuations, uniform in [support_min, support] (its least probable ranks dropped, the
        cycle's successor always kept); None = every context has `support`.
      weights: "zipf" (every context has the same Zipf(a) weights over its ranks) or "dirichlet"
        (markov only: each context draws its own weights from a symmetric
        Dirichlet(dirichlet_alpha), sorted), so the mode has a different shape in every context.
      dirichlet_alpha: concentration of the Dirichlet weights (small = peaked rows).
      hidden_states: H, hidden states of the HMM.
      hidden_support: successors per hidden state of the HMM (sparse transitions).
      seed: seed of the random structure (supports, permutations, cycle).
      entropy_sequences, entropy_length: size of the HMM's Monte Carlo entropy-rate estimate
        (independent sequences, and their length; the second half of each is averaged).
    """

    kind: Literal["markov", "hmm"] = "markov"
    vocab_size: int = 64
    order: int = 1
    support: int = 16
    zipf_a: float = 1.0
    support_min: int | None = None
    weights: Literal["zipf", "dirichlet"] = "zipf"
    dirichlet_alpha: float = 1.0
    hidden_states: int = 16
    hidden_support: int = 4
    seed: int = 0
    entropy_sequences: int = 512
    entropy_length: int = 512

    def __post_init__(self):
        def check(ok, key, message):
            config_lib.require(ok, f"source.{key}", message)

        check(self.vocab_size >= 2, "vocab_size", f"must be >= 2 (got {self.vocab_size})")
        check(self.order in (1, 2), "order", f"must be 1 or 2 (got {self.order})")
        check(
            2 <= self.support <= self.vocab_size,
            "support",
            f"must lie in [2, vocab_size={self.vocab_size}] (got {self.support})",
        )
        check(self.zipf_a >= 0, "zipf_a", f"must be >= 0 (got {self.zipf_a})")
        check(
            self.support_min is None or 1 <= self.support_min <= self.support,
            "support_min",
            f"must lie in [1, support={self.support}] or be null (got {self.support_min})",
        )
        check(self.weights in ("zipf", "dirichlet"), "weights", "must be 'zipf' or 'dirichlet'")
        check(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
        check(
            self.kind == "markov" or (self.support_min is None and self.weights == "zipf"),
            "support_min",
            "heterogeneous supports and Dirichlet weights are for kind: markov only",
        )
        check(self.hidden_states >= 2, "hidden_states", "must be >= 2")
        check(
            1 <= self.hidden_support <= self.hidden_states,
            "hidden_support",
            f"must lie in [1, hidden_states={self.hidden_states}]",
        )
        check(self.entropy_sequences >= 2, "entropy_sequences", "must be >= 2")
        check(self.entropy_length >= 4, "entropy_length", "must be >= 4")
        if self.kind == "markov":
            # Contexts are stored densely (V^k of them).
            check(
                self.vocab_size**self.order <= 2**24,
                "vocab_size",
                f"vocab_size**order = {self.vocab_size**self.order} contexts is too many",
            )


# ----------------------------------------------------------------------------------------------
# Random structure (NumPy, float64: built once, then moved to JAX in float32).


def zipf_weights(s: int, a: float) -> np.ndarray:
    """Normalised Zipf(a) weights of ranks 1..s: w_r proportional to r^-a. [s] float64."""
    w = np.arange(1, s + 1, dtype=np.float64) ** -a
    return w / w.sum()


def _sparse_rows(
    rng: np.random.Generator, rows: int, n: int, s: int, a: float, forced: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`rows` random supports of s of n items, each holding `forced[row]`, with Zipf weights.

    The forced item takes a random rank like the others (it is not privileged by its weight).
    Returns (support [rows, s] int32, weights [rows, s] float64), the support sorted by
    decreasing weight.
    """
    w = zipf_weights(s, a)
    support = np.empty((rows, s), np.int64)
    for r in range(rows):
        others = rng.permutation(n - 1)[: s - 1]
        others = others + (others >= forced[r])  # skip the forced item
        row = np.concatenate([[forced[r]], others])
        support[r] = row[rng.permutation(s)]  # random ranks for all s items
    return support.astype(np.int32), np.broadcast_to(w, (rows, s)).copy()


def _heterogeneous(
    config: SourceConfig, support: np.ndarray, weights: np.ndarray, forced: np.ndarray
) -> np.ndarray:
    """Per-context support sizes and weights (`SourceConfig.support_min`, `weights`), drawn from
    their own stream so the supports are those of the homogeneous source with the same seed.

    Row r keeps its first size_r ranks; the forced (cycle) item, if ranked lower, swaps places
    with a random kept rank (`support` is modified in place), so the chain stays irreducible.
    Returns the new weights [rows, s] float64 (zero beyond each row's size, decreasing before).
    """
    rng = np.random.default_rng([config.seed, 0x4E7E, config.order])
    rows, s = support.shape
    lo = s if config.support_min is None else config.support_min
    sizes = rng.integers(lo, s + 1, size=rows)
    out = np.zeros_like(weights)
    for r in range(rows):
        size = int(sizes[r])
        where = int(np.nonzero(support[r] == forced[r])[0][0])
        if where >= size:
            j = int(rng.integers(size))
            support[r, [j, where]] = support[r, [where, j]]
        if config.weights == "dirichlet":
            w = np.sort(rng.dirichlet(np.full(size, config.dirichlet_alpha)))[::-1]
        else:
            w = zipf_weights(size, config.zipf_a)
        out[r, :size] = w
    return out


def stationary(weights: np.ndarray, next_state: np.ndarray, *, tol: float = 1e-14) -> np.ndarray:
    """Stationary distribution of a sparse chain, by power iteration of its lazy version.

    Args:
      weights: [C, s] the chain's sparse rows (state c takes edge j with probability
        weights[c, j]); next_state: [C, s] the state edge j of row c leads to.
    Returns:
      pi: [C] float64 with pi P = pi. The lazy chain (P + I) / 2 has the same stationary
      distribution and is aperiodic, so the iteration converges even for periodic chains.
    """
    c = weights.shape[0]
    pi = np.full(c, 1.0 / c)
    flat_next = next_state.reshape(-1)
    for _ in range(200_000):
        step = np.bincount(flat_next, weights=(pi[:, None] * weights).reshape(-1), minlength=c)
        new = 0.5 * (pi + step)
        if np.abs(new - pi).sum() < tol:
            pi = new
            break
        pi = new
    pi = pi / pi.sum()
    step = np.bincount(flat_next, weights=(pi[:, None] * weights).reshape(-1), minlength=c)
    residual = np.abs(step - pi).sum()
    if residual > 1e-9:
        raise RuntimeError(f"stationary distribution did not converge (residual {residual:.2e})")
    return pi


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy in nats of distributions along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _inverse_cdf(cdf: jax.Array, u: jax.Array) -> jax.Array:
    """Index j with cdf[j-1] <= u < cdf[j] along the last axis (zero-mass items never drawn).

    cdf: [..., n] non-decreasing with last entry 1; u: [...] uniform in [0, 1)."""
    cdf = jnp.broadcast_to(cdf, (*u.shape, cdf.shape[-1]))  # explicit: rank promotion raises
    j = jnp.sum(cdf <= u[..., None], axis=-1)
    return jnp.minimum(j, cdf.shape[-1] - 1).astype(jnp.int32)


def _cdf(p: np.ndarray) -> jax.Array:
    """Float32 CDF along the last axis, with the last entry of each row exactly 1."""
    c = np.cumsum(p, axis=-1)
    c = c / c[..., -1:]
    c[..., -1] = 1.0
    return jnp.asarray(c, jnp.float32)


def _valid(tokens: jax.Array, vocab_size: int) -> jax.Array:
    return (tokens >= 0) & (tokens < vocab_size)


# ----------------------------------------------------------------------------------------------
# Sources.


class GroundTruthSource(abc.ABC):
    """A stochastic language with exact conditionals. Subclasses are final.

    Token arrays hold ids of the source's vocabulary {0..V-1}; any other id (e.g. a special token
    of a model) has probability 0 under the truth.
    """

    kind: ClassVar[str]

    def __init__(self, config: SourceConfig):
        self.config = config
        self.vocab_size = config.vocab_size

    @abc.abstractmethod
    def sample(self, key: jax.Array, n: int, length: int) -> jax.Array:
        """n independent blocks of `length` tokens of the stationary process. [n, length] int32."""

    @abc.abstractmethod
    def next_token_probs(self, tokens: jax.Array) -> jax.Array:
        """p(x_t = v | x_<t) for every position t of every block. [B, T] -> [B, T, V] float32.

        Position t's distribution does not look at tokens[:, t] itself."""

    @abc.abstractmethod
    def log_prob(self, tokens: jax.Array) -> jax.Array:
        """log p(x_t | x_<t) per token. [B, T] -> [B, T] float32 (-inf: impossible token; NaN:
        no conditional is defined, a Markov context holding a token outside the vocabulary)."""

    @property
    @abc.abstractmethod
    def entropy_rate(self) -> tuple[float, float]:
        """(entropy rate in nats per token, its standard error; 0 when exact)."""

    @property
    @abc.abstractmethod
    def unigram(self) -> np.ndarray:
        """The stationary token distribution. [V] float64."""

    @abc.abstractmethod
    def transitions(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """The true transitions and their stationary mass, for `truth.support_coverage`.

        Returns (k, context [n], token [n], mass [n]): every (k-token context, next token) pair of
        positive probability, the context encoded as sum_i x_i V^(k-1-i), and its stationary joint
        probability pi(context) p(token | context) (summing to 1). Markov chains use their own
        order; the HMM uses bigrams (k = 1)."""

    @abc.abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The source's defining arrays (saved next to the config in a run directory)."""

    def summary(self) -> dict[str, Any]:
        h, se = self.entropy_rate
        return {
            "config": config_lib.to_dict(self.config),
            "entropy_rate": h,
            "entropy_rate_se": se,
            "unigram_entropy": float(_entropy(self.unigram)),
            "checksum": _checksum(self.arrays()),
        }


class MarkovSource(GroundTruthSource):
    """Sparse Zipfian Markov chain of order k over V tokens (see the module docstring).

    Contexts are the last k tokens, encoded as c = sum_i x_i V^(k-1-i); after token x the context
    becomes (c V + x) mod V^k. Positions t < k of a block are drawn from the stationary k-gram
    distribution (the marginal of its first t + 1 tokens).
    """

    kind = "markov"

    def __init__(self, config: SourceConfig):
        super().__init__(config)
        v, k, s = config.vocab_size, config.order, config.support
        rng = np.random.default_rng([config.seed, 0x5EED, k])
        cycle = rng.permutation(v)
        successor = np.empty(v, np.int64)
        successor[cycle] = np.roll(cycle, -1)  # a random Hamiltonian cycle: irreducibility
        contexts = v**k
        last = np.arange(contexts) % v
        self.support, self.weights = _sparse_rows(
            rng, contexts, v, s, config.zipf_a, successor[last]
        )
        if config.support_min is not None or config.weights != "zipf":
            self.weights = _heterogeneous(config, self.support, self.weights, successor[last])
        next_ctx = (np.arange(contexts)[:, None] * v + self.support) % contexts
        self.pi = stationary(self.weights, next_ctx)  # [C] over contexts
        self._unigram = self.pi.reshape(-1, v).sum(0) if k == 1 else self.pi.reshape(v, v).sum(1)
        self._rate = float(np.sum(self.pi * _entropy(self.weights)))
        # JAX copies: sparse rows for sampling and scoring, dense head conditionals.
        self._support = jnp.asarray(self.support, jnp.int32)
        self._weights = jnp.asarray(self.weights, jnp.float32)
        self._cdf = _cdf(self.weights)
        self._pi_cdf = _cdf(self.pi)
        heads = [self._unigram]
        if k == 2:
            joint = self.pi.reshape(v, v)
            heads.append(joint / joint.sum(1, keepdims=True))  # p(x1 | x0)
        self._heads = [jnp.asarray(h, jnp.float32) for h in heads]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"support": self.support, "weights": self.weights, "stationary": self.pi}

    @property
    def entropy_rate(self) -> tuple[float, float]:
        return self._rate, 0.0

    @property
    def unigram(self) -> np.ndarray:
        return self._unigram

    def transitions(self):
        k, v = self.config.order, self.vocab_size
        ctx = np.repeat(np.arange(v**k), self.config.support)
        mass = (self.pi[:, None] * self.weights).reshape(-1)
        keep = mass > 0
        return k, ctx[keep], self.support.reshape(-1).astype(np.int64)[keep], mass[keep]

    def sample(self, key: jax.Array, n: int, length: int) -> jax.Array:
        return _markov_sample(
            key, self._pi_cdf, self._cdf, self._support, n, length, self.vocab_size,
            self.config.order,
        )  # fmt: skip

    def _heads_args(self):
        return self._heads[0], (self._heads[1] if self.config.order == 2 else self._heads[0])

    def next_token_probs(self, tokens: jax.Array) -> jax.Array:
        rows, defined = _markov_dense(
            self._support, self._weights, *self._heads_args(), jnp.asarray(tokens, jnp.int32),
            order=self.config.order,
        )  # fmt: skip
        return jnp.where(defined[..., None], rows, jnp.nan)

    def log_prob(self, tokens: jax.Array) -> jax.Array:
        return _markov_log_prob(
            self._support, self._weights, *self._heads_args(), jnp.asarray(tokens, jnp.int32),
            order=self.config.order,
        )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("n", "length", "vocab_size", "order"))
def _markov_sample(key, pi_cdf, cdf, support, n, length, vocab_size, order):
    k_head, k_body = jax.random.split(key)
    contexts = pi_cdf.shape[0]
    ctx = _inverse_cdf(pi_cdf, jax.random.uniform(k_head, (n,)))  # [n] stationary k-gram
    head = [(ctx // vocab_size ** (order - 1 - i)) % vocab_size for i in range(order)]
    head = jnp.stack(head, axis=1)[:, :length]  # [n, min(k, length)]
    steps = max(length - order, 0)
    if steps == 0:
        return head.astype(jnp.int32)

    def step(c, u):
        j = _inverse_cdf(cdf[c], u)  # [n]
        tok = jnp.take_along_axis(support[c], j[:, None], axis=1)[:, 0]
        return (c * vocab_size + tok) % contexts, tok

    _, body = jax.lax.scan(step, ctx, jax.random.uniform(k_body, (steps, n)))  # [steps, n]
    return jnp.concatenate([head, body.T], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("order",))
def _markov_dense(support, weights, head0, head1, tokens, *, order):
    """Dense conditionals [B, T, V] and whether each position's conditional is defined [B, T].

    head0: [V] stationary unigram (position 0); head1: [V, V] p(x1 | x0) (position 1, order 2).
    """
    v = head0.shape[0]
    b, t = tokens.shape
    ok = _valid(tokens, v)
    safe = jnp.where(ok, tokens, 0)
    # Context of position t: the tokens t-k..t-1, the one at t-i weighing V^(i-1).
    ctx = jnp.zeros_like(safe)
    defined = jnp.ones(tokens.shape, bool)
    for i in range(1, order + 1):
        ctx = ctx + jnp.pad(safe, ((0, 0), (i, 0)))[:, :t] * (v ** (i - 1))
        defined = defined & jnp.pad(ok, ((0, 0), (i, 0)), constant_values=True)[:, :t]
    bi = jnp.arange(b)[:, None, None]
    ti = jnp.arange(t)[None, :, None]
    rows = jnp.zeros((b, t, v), jnp.float32).at[bi, ti, support[ctx]].set(weights[ctx])
    # Head positions t < k: the stationary k-gram's marginals.
    pos = jnp.arange(t)[None, :, None]
    rows = jnp.where(pos == 0, head0[None, None, :], rows)
    if order == 2:
        rows = jnp.where(pos == 1, head1[safe[:, 0]][:, None, :], rows)
    return rows, defined


@functools.partial(jax.jit, static_argnames=("order",))
def _markov_log_prob(support, weights, head0, head1, tokens, *, order):
    rows, defined = _markov_dense(support, weights, head0, head1, tokens, order=order)
    return _gather_log(rows, tokens, defined, head0.shape[0])


def _gather_log(rows, tokens, defined, vocab_size):
    """log rows[b, t, tokens[b, t]]; -inf for impossible or out-of-vocabulary tokens."""
    ok = _valid(tokens, vocab_size)
    p = jnp.take_along_axis(rows, jnp.where(ok, tokens, 0)[..., None], axis=-1)[..., 0]
    logp = jnp.where(ok & (p > 0), jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
    return jnp.where(defined, logp, jnp.nan)


class HMMSource(GroundTruthSource):
    """Hidden Markov model with sparse Zipfian transitions and Zipfian emissions.

    The hidden chain starts from its stationary distribution. Conditionals come from the forward
    recursion in log space: with the predictive filter f_t(h) = p(h_t = h | x_<t),
    p(x_t | x_<t) = sum_h f_t(h) E[h, x_t], then f_{t+1} = normalise(f_t * E[:, x_t]) A. A token
    impossible under the model (or outside the vocabulary) leaves the filter unchanged.

    Entropy rate: no closed form. Since H(X_t | X_<t) decreases to the rate and
    H(X_t | X_<t, h_0) increases to it (Cover & Thomas, Thm. 4.5.1), `entropy_rate` averages the
    exact predictive entropies H(p(. | x_<t)) (a Rao-Blackwellised estimate of H(X_t | X_<t))
    over the second half of `entropy_sequences` stationary sequences of `entropy_length` tokens;
    its SE is across sequences. `entropy_rate_gap` is the mean difference between the two bounds
    at the last position (an upper bound on the remaining truncation bias).
    """

    kind = "hmm"

    def __init__(self, config: SourceConfig):
        super().__init__(config)
        v, hs, s = config.vocab_size, config.hidden_states, config.support
        rng = np.random.default_rng([config.seed, 0x4833, hs])
        cycle = rng.permutation(hs)
        successor = np.empty(hs, np.int64)
        successor[cycle] = np.roll(cycle, -1)
        a_sup, a_w = _sparse_rows(rng, hs, hs, config.hidden_support, config.zipf_a, successor)
        e_sup, e_w = _sparse_rows(rng, hs, v, s, config.zipf_a, rng.integers(0, v, hs))
        self.transition = np.zeros((hs, hs))
        np.put_along_axis(self.transition, a_sup.astype(np.int64), a_w, axis=1)
        self.emission = np.zeros((hs, v))
        np.put_along_axis(self.emission, e_sup.astype(np.int64), e_w, axis=1)
        self.pi = stationary(a_w, a_sup.astype(np.int64))  # [H]
        self._unigram = self.pi @ self.emission
        self._log_a = jnp.asarray(_safe_log(self.transition), jnp.float32)
        self._log_e = jnp.asarray(_safe_log(self.emission), jnp.float32)
        self._log_pi = jnp.asarray(_safe_log(self.pi), jnp.float32)
        self._a_cdf = _cdf(self.transition)
        self._e_cdf = _cdf(self.emission)
        self._pi_cdf = _cdf(self.pi)
        self._rate, self._rate_se, self.entropy_rate_gap = self._estimate_entropy_rate()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"transition": self.transition, "emission": self.emission, "stationary": self.pi}

    @property
    def entropy_rate(self) -> tuple[float, float]:
        return self._rate, self._rate_se

    @property
    def unigram(self) -> np.ndarray:
        return self._unigram

    def transitions(self):
        # p(x0 = a, x1 = b) = sum_{h,h'} pi(h) E[h, a] A[h, h'] E[h', b]
        joint = (self.pi[:, None] * self.emission).T @ self.transition @ self.emission  # [V, V]
        a, b = np.nonzero(joint > 0)
        return 1, a.astype(np.int64), b.astype(np.int64), joint[a, b]

    def sample(self, key: jax.Array, n: int, length: int) -> jax.Array:
        return _hmm_sample(key, self._pi_cdf, self._a_cdf, self._e_cdf, n, length)

    def _forward(self, tokens: jax.Array, log_f0: jax.Array | None = None) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        if log_f0 is None:
            log_f0 = jnp.broadcast_to(self._log_pi, (tokens.shape[0], self._log_pi.shape[0]))
        return _hmm_next_probs(self._log_a, self._log_e, log_f0, tokens)

    def next_token_probs(self, tokens: jax.Array) -> jax.Array:
        return self._forward(tokens)

    def log_prob(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        log_f0 = jnp.broadcast_to(self._log_pi, (tokens.shape[0], self._log_pi.shape[0]))
        return _hmm_log_prob(self._log_a, self._log_e, log_f0, tokens)

    def _estimate_entropy_rate(self) -> tuple[float, float, float]:
        cfg = self.config
        upper, lower = _hmm_entropy_profile(
            jax.random.key(cfg.seed), self._pi_cdf, self._a_cdf, self._e_cdf, self._log_a,
            self._log_e, self._log_pi, n=cfg.entropy_sequences, length=cfg.entropy_length,
        )  # fmt: skip
        upper, lower = np.asarray(upper, np.float64), np.asarray(lower, np.float64)  # [n, L]
        per_seq = upper[:, cfg.entropy_length // 2 :].mean(1)
        gap = float(np.mean(upper[:, -1] - lower[:, -1]))
        n = cfg.entropy_sequences
        return float(per_seq.mean()), float(per_seq.std(ddof=1) / np.sqrt(n)), gap

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["entropy_rate_gap"] = self.entropy_rate_gap
        return out


@jax.jit
def _hmm_log_prob(log_a, log_e, log_f0, tokens):
    rows = _hmm_next_probs(log_a, log_e, log_f0, tokens)
    return _gather_log(rows, tokens, jnp.ones(tokens.shape, bool), log_e.shape[1])


def _safe_log(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)


@functools.partial(jax.jit, static_argnames=("n", "length", "return_h0"))
def _hmm_sample(key, pi_cdf, a_cdf, e_cdf, n, length, return_h0=False):
    k0, k1, k2 = jax.random.split(key, 3)
    h0 = _inverse_cdf(pi_cdf, jax.random.uniform(k0, (n,)))

    def step(h, u):
        x = _inverse_cdf(e_cdf[h], u[0])
        return _inverse_cdf(a_cdf[h], u[1]), x

    u = jnp.stack(
        [jax.random.uniform(k1, (length, n)), jax.random.uniform(k2, (length, n))], axis=1
    )  # [L, 2, n]
    _, xs = jax.lax.scan(step, h0, u)
    tokens = xs.T.astype(jnp.int32)  # [n, L]
    return (tokens, h0) if return_h0 else tokens


@functools.partial(jax.jit, static_argnames=("n", "length"))
def _hmm_entropy_profile(key, pi_cdf, a_cdf, e_cdf, log_a, log_e, log_pi, *, n, length):
    """Predictive entropies H(p(. | x_<t)) of n stationary sequences ([n, L]), without and with
    the initial hidden state known (the two bounds on the entropy rate)."""
    tokens, h0 = _hmm_sample(key, pi_cdf, a_cdf, e_cdf, n, length, return_h0=True)

    def entropies(log_f0):
        p = _hmm_next_probs(log_a, log_e, log_f0, tokens)  # [n, L, V]
        return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)

    hidden = log_pi.shape[0]
    known = jnp.where(jax.nn.one_hot(h0, hidden, dtype=bool), 0.0, -jnp.inf)  # log one-hot
    return entropies(jnp.broadcast_to(log_pi, (n, hidden))), entropies(known)


@jax.jit
def _hmm_next_probs(log_a, log_e, log_f0, tokens):
    """Forward recursion in log space. log_f0: [B, H]; tokens: [B, T] -> [B, T, V]."""
    v = log_e.shape[1]

    def step(log_f, x):  # log_f: [B, H] log p(h_t | x_<t); x: [B]
        log_pred = jax.nn.logsumexp(log_f[:, :, None] + log_e[None], axis=1)  # [B, V]
        ok = _valid(x, v)
        safe = jnp.where(ok, x, 0)
        log_px = jnp.take_along_axis(log_pred, safe[:, None], axis=1)  # [B, 1]
        possible = ok & jnp.isfinite(log_px[:, 0])
        post = log_f + log_e[:, safe].T - jnp.where(possible[:, None], log_px, 0.0)  # [B, H]
        post = jnp.where(possible[:, None], post, log_f)  # impossible token: no update
        log_next = jax.nn.logsumexp(post[:, :, None] + log_a[None], axis=1)  # [B, H]
        return log_next, jnp.exp(log_pred)

    _, probs = jax.lax.scan(step, log_f0, tokens.T)  # [T, B, V]
    return jnp.swapaxes(probs, 0, 1)


# ----------------------------------------------------------------------------------------------
# Counting.


def ngram_codes(blocks: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """Codes c * V + x of every (k-token context c, next token x) pair within blocks, with every
    token in the vocabulary. [M] int64."""
    blocks = np.asarray(blocks, np.int64)
    n, t = blocks.shape
    if t <= k:
        return np.zeros(0, np.int64)
    windows = np.stack([blocks[:, i : t - k + i] for i in range(k + 1)], axis=-1)  # [N, T-k, k+1]
    windows = windows.reshape(-1, k + 1)
    ok = np.all((windows >= 0) & (windows < vocab_size), axis=1)
    windows = windows[ok]
    return (windows * vocab_size ** np.arange(k, -1, -1)).sum(1)


def token_counts(blocks: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often every token of the vocabulary occurs in `blocks` (ids outside it are skipped).
    [V] int64."""
    tokens = np.asarray(blocks, np.int64).reshape(-1)
    return np.bincount(tokens[(tokens >= 0) & (tokens < vocab_size)], minlength=vocab_size)


# ----------------------------------------------------------------------------------------------
# Building, saving and loading.

SOURCES: dict[str, type[GroundTruthSource]] = {"markov": MarkovSource, "hmm": HMMSource}


@functools.lru_cache(maxsize=8)
def build_source(config: SourceConfig) -> GroundTruthSource:
    """The source a config describes (deterministic in the config; cached per config)."""
    return SOURCES[config.kind](config)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def save_source(source: GroundTruthSource, folder: pathlib.Path) -> None:
    """Writes `source.json` (config, entropy rate, checksum) and `source.npz` into `folder`."""
    folder = pathlib.Path(folder)
    fileio.save_npz(folder / "source.npz", source.arrays())
    fileio.atomic_write_json(folder / "source.json", source.summary())


def load_source(folder: pathlib.Path) -> GroundTruthSource:
    """Rebuilds the source saved in `folder` from its config and checks it is the saved one."""
    folder = pathlib.Path(folder)
    path = folder / "source.json"
    try:
        saved = json.loads(path.read_text())
        raw = dict(saved["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a saved ground-truth source ({e})") from None
    source = build_source(config_lib.build(SourceConfig, raw, "source"))
    if source.summary()["checksum"] != saved.get("checksum"):
        raise ValueError(
            f"{path}: rebuilding the source from its config gives different arrays than the "
            "saved ones (the source code changed since this run was made)"
        )
    return source


# ----------------------------------------------------------------------------------------------
# The source as the language-model experiment's data.

# Model ids 0..2 are OPT's <s>, <pad>, </s> (pad = 1, bos = eos = 2): source token x is model id
# x + TOKEN_OFFSET, so the model's vocabulary is V + 3.
TOKEN_OFFSET = 3


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceDataConfig:
    """Real data drawn from a ground-truth source: the LM experiment's `data: {kind: source}`.

    A data source of `collapse_jax.lm.experiment` (`load() -> lm.data.LMCorpus`): the blocks are
    a deterministic function of this config, in model ids (source token x is id x + 3; 0..2 are
    OPT's <s>, <pad>, </s>), and a randomly initialised OPT gets V + 3 ids.

    Attributes:
      source: the ground-truth language.
      num_train_blocks: N, real training blocks (generation 0's data and the prompts).
      num_valid_blocks: real validation blocks (the trainer's best-epoch selection); 0 = none.
      num_eval_blocks: held-out real blocks every generation is evaluated on, exactly.
      block_size: T, tokens per block.
      seed: seed of the drawn blocks (the three splits are independent streams).
      tail_mass: q of `tail_retention` (the least probable q of each true conditional).
      ranked_contexts: held-out contexts shown in the ranked-conditionals figure.
    """

    kind: ClassVar[str] = "source"
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    num_train_blocks: int = 256
    num_valid_blocks: int = 0
    num_eval_blocks: int = 128
    block_size: int = 64
    seed: int = 0
    tail_mass: float = 0.1
    ranked_contexts: int = 4

    def __post_init__(self):
        def check(ok, key, message):
            config_lib.require(ok, f"data.{key}", message)

        check(self.num_train_blocks >= 2, "num_train_blocks", "must be >= 2")
        check(self.num_valid_blocks >= 0, "num_valid_blocks", "must be >= 0")
        check(self.num_eval_blocks >= 1, "num_eval_blocks", "must be >= 1")
        check(self.block_size >= 2, "block_size", "must be >= 2")
        check(0 < self.tail_mass <= 1, "tail_mass", f"must lie in (0, 1] (got {self.tail_mass})")
        check(self.ranked_contexts >= 1, "ranked_contexts", "must be >= 1")

    @property
    def model_vocab_size(self) -> int:
        return self.source.vocab_size + TOKEN_OFFSET

    def blocks(self, split: Literal["train", "valid", "eval"]) -> np.ndarray:
        """The real blocks of a split in model ids. [N, block_size] int32."""
        n = {"train": self.num_train_blocks, "valid": self.num_valid_blocks,
             "eval": self.num_eval_blocks}[split]  # fmt: skip
        key = jax.random.fold_in(jax.random.key(self.seed), ("train", "eval", "valid").index(split))
        return to_model_ids(build_source(self.source).sample(key, n, self.block_size))

    def load(self):
        """The experiment's corpus (`lm.data.LMCorpus`)."""
        v = self.source.vocab_size
        return LMCorpus(
            train=self.blocks("train"),
            valid=self.blocks("valid") if self.num_valid_blocks else None,
            eval=self.blocks("eval"),
            vocab_size=self.model_vocab_size,
            special_ids=tuple(range(TOKEN_OFFSET)),
            decode=lambda ids: " ".join(
                str(int(i) - TOKEN_OFFSET) if TOKEN_OFFSET <= i < v + TOKEN_OFFSET
                else ("<pad>" if i == 1 else "</s>" if i == 2 else f"<{int(i)}>")
                for i in ids
            ),
        )  # fmt: skip


def to_model_ids(tokens: np.ndarray) -> np.ndarray:
    """Source tokens -> model ids. [N, T] int32."""
    return (np.asarray(tokens, np.int64) + TOKEN_OFFSET).astype(np.int32)


def to_source_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Model ids -> source tokens; special and out-of-range ids become -1 (impossible)."""
    x = np.asarray(ids, np.int64) - TOKEN_OFFSET
    return np.where((x >= 0) & (x < vocab_size), x, -1).astype(np.int32)
