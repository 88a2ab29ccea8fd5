"""A linear classifier retrained on verified synthetic labels (`kind: verification`).

The setting (the simplest one in which Feng et al. 2024's phase transition can be derived
exactly): a symmetric Gaussian mixture, y = +-1 with probability 1/2 and x | y ~ N(y mu, I_d)
with mu = separation * e_1. The learner is the mean-difference classifier w = mean(y_i x_i) over
its training points, predicting sign(w . x); its test error is exact,
err(w) = Phi(-w . mu / |w|) (1/2 for w = 0).

Every generation after the first labels `num` fresh inputs from the true marginal with a
generator, and a verifier discards the points it judges wrongly labelled:
- `labeller: noisy`: the true label, flipped with probability `flip` (= p), independently of x
  (Feng et al.'s synthesized data with label noise p);
- `labeller: model`: the current classifier's own prediction sign(w . x), then flipped with
  probability `flip` (a classifier retrained on its own labels);
- the verifier keeps a correctly labelled point with probability `q_correct` and discards a
  wrongly labelled one with probability `q_wrong` (its accuracies on the two kinds of point;
  q_correct = 1, q_wrong = 0 keeps everything: no verifier). Its decisions are independent of x
  given whether the label is right.

Closed forms (derived here; tested against Monte Carlo in tests/unit/theory/test_verification.py):

1. Selected label error. A kept point is wrong with probability
   p' = p (1 - q_wrong) / (p (1 - q_wrong) + (1 - p) q_correct)       (Bayes' rule),
   and a candidate is kept with probability P_K = p (1 - q_wrong) + (1 - p) q_correct.

2. The phase transition at p' = 1/2. With labels flipped independently of x at rate p', the
   kept points' y' x = s mu + z with s = +-1 (P(s = 1) = 1 - p') and z ~ N(0, I) independent of s,
   so w = s_bar mu + z_bar with E s_bar = 1 - 2 p': as m -> infinity w / |w| -> sign(1 - 2 p')
   mu / |mu|, and the test error tends to Phi(-|mu|) (the Bayes error) when p' < 1/2, to 1/2 at
   p' = 1/2 and to Phi(|mu|) (worse than chance) when p' > 1/2. With no verifier p' = p, so
   verification helps exactly by moving p' below 1/2: p (1 - q_wrong) < (1 - p) q_correct.
   For finite m in d = 1, w < 0 with probability
   P(w < 0 | m) = sum_k Bin(k; m, 1 - p') Phi(-(2k - m) |mu| / sqrt(m)),
   the number kept m ~ Bin(num, P_K), and E err = Phi(-|mu|) + (Phi(|mu|) - Phi(-|mu|)) P(w < 0)
   (m = 0 leaves w = 0, error 1/2) (`expected_error_noisy`).

3. Retrained on its own labels (`labeller: model`, flip 0): with u = w / |w|, t = u . mu and the
   current error e = Phi(-t), the kept points' E[y' x 1{kept}] = P_K (1 - 2 p') mu
   + (q_correct + 1 - q_wrong) phi(t) u, where p' is formula 1 with p = e (the derivation:
   E[y x 1{wrong}] = mu Phi(-t) - u phi(t) for y x ~ N(mu, I)). The pull towards mu is
   positive exactly when p' < 1/2: the same transition, now for a model whose errors sit next to
   its boundary; the u term reinforces the model's own direction. In the infinite-sample limit
   the angle theta to mu follows tan theta' = B sin theta / (A |mu| + B cos theta), A = P_K (1 - 2
   p'), B = (q_correct + 1 - q_wrong) phi(t) (`population_step`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.scipy.special import ndtr

from collapse_jax.config import ConfigError
from collapse_jax.loop.learner import KnobbedLearner

_F = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VerificationConfig:
    """The Gaussian mixture, the generator of synthetic labels and the verifier.

    Attributes:
      dim: d, the input dimension.
      separation: |mu|, the distance of each class mean from the origin (> 0).
      labeller: "noisy" (the true label flipped with probability `flip`) or "model" (the
        current classifier's prediction, flipped with probability `flip`).
      flip: the generator's label-flip probability p in [0, 1].
      q_correct: the verifier's probability of keeping a correctly labelled point (its accuracy
        on correct labels), in [0, 1].
      q_wrong: its probability of discarding a wrongly labelled point (its accuracy on wrong
        labels), in [0, 1]. q_correct = 1, q_wrong = 0: no verifier.
    """

    kind: ClassVar[str] = "verification"

    dim: int = 1
    separation: float = 1.0
    labeller: Literal["noisy", "model"] = "noisy"
    flip: float = 0.0
    q_correct: float = 1.0
    q_wrong: float = 0.0

    def __post_init__(self):
        if self.dim < 1:
            raise ConfigError(f"model.dim: must be >= 1 (got {self.dim})")
        if not (math.isfinite(self.separation) and self.separation > 0):
            raise ConfigError(f"model.separation: must be > 0 (got {self.separation})")
        if self.labeller not in ("noisy", "model"):
            raise ConfigError(f"model.labeller: {self.labeller!r} is not 'noisy' or 'model'")
        for name in ("flip", "q_correct", "q_wrong"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"model.{name}: must lie in [0, 1] (got {v})")
        if self.q_correct == 0.0 and self.q_wrong == 1.0:
            raise ConfigError("model.q_correct, model.q_wrong: this verifier discards every point")


class VerifData(NamedTuple):
    """Labelled points: inputs x [N, d], the labels used y [N] (+-1), whether each label is
    wrong [N] (bool), and whether the verifier kept the point [N] (bool; real points: kept)."""

    x: Array
    y: Array
    wrong: Array
    kept: Array


class VerifParams(NamedTuple):
    """The classifier w [d] and its training set's kept share and label error among kept points."""

    w: Array
    kept_fraction: Array
    label_error: Array


def selected_error(p: Any, q_correct: Any, q_wrong: Any) -> Any:
    """p': the probability that a point the verifier keeps is wrongly labelled (formula 1)."""
    bad = p * (1 - q_wrong)
    return bad / (bad + (1 - p) * q_correct)


def keep_probability(p: Any, q_correct: Any, q_wrong: Any) -> Any:
    """P_K: the probability that the verifier keeps a candidate whose label is wrong w.p. p."""
    return p * (1 - q_wrong) + (1 - p) * q_correct


def expected_error_noisy(num: int, separation: float, p_sel: float, p_keep: float) -> float:
    """E test error of the classifier fitted on `num` candidates, each kept with probability
    `p_keep`, whose kept labels are wrong independently of x with probability `p_sel`; d = 1
    (formula 2; exact)."""
    from scipy import stats

    mu = float(separation)
    m = np.arange(num + 1)
    pm = stats.binom.pmf(m, num, p_keep)
    p_neg = 0.5 * pm[0]  # m = 0: w = 0, error 1/2, counted as half a sign error
    for mm in range(1, num + 1):
        if pm[mm] < 1e-300:
            continue
        k = np.arange(mm + 1)
        pk = stats.binom.pmf(k, mm, 1 - p_sel)
        p_neg += pm[mm] * float(np.sum(pk * stats.norm.cdf(-(2 * k - mm) * mu / np.sqrt(mm))))
    lo, hi = stats.norm.cdf(-mu), stats.norm.cdf(mu)
    return float(lo + (hi - lo) * p_neg)


def population_step(theta: float, config: VerificationConfig) -> float:
    """The angle to mu after one generation of `labeller: model` (flip 0) in the
    infinite-sample limit (formula 3), from the angle `theta` (radians, in [0, pi])."""
    from scipy import stats

    c = config
    t = c.separation * math.cos(theta)
    e = stats.norm.cdf(-t)
    a = keep_probability(e, c.q_correct, c.q_wrong) * (
        1 - 2 * selected_error(e, c.q_correct, c.q_wrong)
    )
    b = (c.q_correct + 1 - c.q_wrong) * stats.norm.pdf(t)
    return math.atan2(b * math.sin(theta), a * c.separation + b * math.cos(theta))


class VerificationLearner(KnobbedLearner[VerifParams, VerifData]):
    """The mean-difference classifier refitted on verified synthetic labels (jittable; the
    generator's flip rate and the verifier's accuracies are knobs, so the points of a sweep over
    them share one compiled program)."""

    jittable: ClassVar[bool] = True
    knob_fields: ClassVar[frozenset[str]] = frozenset({"flip", "q_correct", "q_wrong"})

    def knobs(self) -> dict[str, float]:
        c = self.config
        return {"flip": c.flip, "q_correct": c.q_correct, "q_wrong": c.q_wrong}

    @property
    def mu(self) -> Array:
        return jnp.zeros((self.config.dim,), _F).at[0].set(self.config.separation)

    def _inputs(self, key: Array, num: int) -> tuple[Array, Array]:
        """`num` inputs of the true mixture and their true labels (+-1)."""
        k_y, k_z = jax.random.split(key)
        y = jnp.where(jax.random.bernoulli(k_y, 0.5, (num,)), 1.0, -1.0).astype(_F)
        x = y[:, None] * self.mu[None, :] + jax.random.normal(k_z, (num, self.config.dim), _F)
        return x, y

    def draw_real(self, key: Array, num: int | Array) -> VerifData:
        x, y = self._inputs(key, num)
        false = jnp.zeros((num,), bool)
        return VerifData(x, y, false, ~false)

    def init(self, key: Array) -> VerifParams:
        return VerifParams(jnp.zeros((self.config.dim,), _F), _F(0), _F(0))

    def fit(self, key: Array, data: VerifData, params: VerifParams, **kw: Any) -> VerifParams:
        keep = data.kept.astype(_F)
        m = jnp.sum(keep)
        w = jnp.sum((keep * data.y)[:, None] * data.x, axis=0) / jnp.maximum(m, 1.0)
        bad = jnp.sum(keep * data.wrong.astype(_F)) / jnp.maximum(m, 1.0)
        return VerifParams(w, m / data.y.shape[0], bad)

    def evaluate(self, key: Array, params: VerifParams, reference: Any) -> dict[str, Array]:
        """`test_error` Phi(-w . mu / |w|) (exact; 1/2 for w = 0), `cosine` of w with mu, and
        the training set's `kept_fraction` and `label_error` (wrong labels among kept points)."""
        norm = jnp.sqrt(jnp.sum(jnp.square(params.w)))
        proj = params.w[0] * self.config.separation
        cos = jnp.where(norm > 0, params.w[0] / jnp.where(norm > 0, norm, 1.0), 0.0)
        err = jnp.where(norm > 0, ndtr(-proj / jnp.where(norm > 0, norm, 1.0)), 0.5)
        return {
            "test_error": err,
            "cosine": cos,
            "kept_fraction": params.kept_fraction,
            "label_error": params.label_error,
        }

    def sample(self, key: Array, params: VerifParams, num: int | Array, **kw: Any) -> VerifData:
        """`num` fresh inputs labelled by the generator (`labeller`, `flip`) and judged by the
        verifier (`q_correct`, `q_wrong`); discarded points stay in the data, marked not kept."""
        c = self.config
        k_in, k_flip, k_ver = jax.random.split(key, 3)
        x, y_true = self._inputs(k_in, num)
        if c.labeller == "model":
            y = jnp.where(x @ params.w >= 0, 1.0, -1.0).astype(_F)
        else:
            y = y_true
        flip = jax.random.uniform(k_flip, (num,), _F) < self.knob("flip")
        y = jnp.where(flip, -y, y)
        wrong = y != y_true
        u = jax.random.uniform(k_ver, (num,), _F)
        kept = jnp.where(wrong, u >= self.knob("q_wrong"), u < self.knob("q_correct"))
        return VerifData(x, y, wrong, kept)
