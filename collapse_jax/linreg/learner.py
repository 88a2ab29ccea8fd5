"""Recursive linear regression with a fixed design (Gerstgrasser et al. 2024, Sec. 3; Dohmatob
et al. 2024): the learner `kind: linear_regression`.

Each chain draws its own "world": a true weight vector w* ~ N(0, I_d) and a fixed design
X (T x d, i.i.d. N(0, 1) entries). Generation 0 fits ordinary least squares (or ridge) to
y_0 = X w* + eps_0, eps ~ N(0, sigma^2 I_T); every later generation relabels the same design with
the previous fit plus fresh noise, y_n = X w_{n-1} + eps_n, and refits.

Closed forms (OLS, generation n = 0 fitted to real data; A = (X^T X)^{-1} X^T, so A X = I, and
u_k = A eps_k are i.i.d. with covariance sigma^2 (X^T X)^{-1}):

- replace: w_n = w_{n-1} + u_n, so w_n - w* = u_0 + ... + u_n and
      E||w_n - w*||^2 = (n + 1) sigma^2 E tr (X^T X)^{-1} = (n + 1) sigma^2 d / (T - d - 1),
  the inverse-Wishart mean. (Gerstgrasser et al. count fits from 1 and write n sigma^2 d / (T-d-1);
  our generation n is their fit n + 1.)
- accumulate (every generation keeps all labels so far: generation n fits on n + 1 copies of the
  design): OLS on the stacked data is the average of the per-copy solutions,
      w_n = (1 / (n + 1)) sum_{k<=n} A y_k,   with A y_0 = w* + u_0, A y_k = w_{k-1} + u_k.
  Writing e_n = w_n - w*: (n + 1) e_n = sum_{k<=n} u_k + sum_{k<n} e_k. By induction
  e_n = sum_{k=0}^{n} u_k / (k + 1)   [check: sum_{j<n} e_j = sum_{k<n} u_k (n - k) / (k + 1), and
  1 + (n - k) / (k + 1) = (n + 1) / (k + 1)]; the u_k are independent, hence
      E||w_n - w*||^2 = sigma^2 d / (T - d - 1) * sum_{k=1}^{n+1} 1 / k^2  ->  (pi^2 / 6) x gen 0,
  bounded, whereas replace grows linearly.
- test MSE on fresh isotropic inputs: E (x^T (w_n - w*) - eps)^2 = ||w_n - w*||^2 + sigma^2.

Data are labelled rows of the chain's design: `LinRegData(row, y, real, w_star, design_key)`.
Real points store only their noise and are labelled with the chain's w* when a fit resolves them,
so `draw_real` (fresh real labels for the `gamma` share) needs no access to the chain's world; the
world (w*, the key that regenerates X) travels in every data set and in the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from collapse_jax.config import require
from collapse_jax.loop.learner import KnobbedLearner

_F = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinearRegressionConfig:
    """Recursive least squares on a fixed Gaussian design.

    Attributes:
      dim: d, number of features (and of true weights).
      num_points: T, rows of the fixed design; each generation relabels them.
      noise_std: sigma, standard deviation of the label noise.
      ridge: lambda >= 0 of the ridge penalty lambda ||w||^2 (0 = ordinary least squares, which
        needs num_points >= dim).
      test_points: fresh isotropic inputs drawn per evaluation for `test_mse`.
      sampling_bias: lambda, synthetic labels carry noise N(0, lambda sigma^2) (1 = the model).
    """

    kind: ClassVar[str] = "linear_regression"

    dim: int = 10
    num_points: int = 100
    noise_std: float = 1.0
    ridge: float = 0.0
    test_points: int = 1000
    sampling_bias: float = 1.0

    def __post_init__(self):
        require(self.dim >= 1, "model.dim", f"must be >= 1 (got {self.dim})")
        require(self.noise_std > 0, "model.noise_std", f"must be > 0 (got {self.noise_std})")
        require(self.ridge >= 0, "model.ridge", f"must be >= 0 (got {self.ridge})")
        require(self.test_points >= 1, "model.test_points", "must be >= 1")
        require(self.sampling_bias >= 0, "model.sampling_bias", "must be >= 0")
        require(
            self.num_points >= self.dim or self.ridge > 0,
            "model.num_points",
            f"must be >= dim={self.dim} for ordinary least squares (got {self.num_points}); "
            "set model.ridge > 0 for an under-determined design",
        )


class LinRegData(NamedTuple):
    """Labelled rows of one chain's design.

    row: [N] int32 design row of each point; y: [N] label (real points: only the noise);
    real: [N] bool, labelled by w* at fit time; w_star: [d] the chain's true weights;
    design_key: [2] uint32 raw key that regenerates the design X [T, d];
    has_world: bool scalar, False for `draw_real`'s parts (their world comes from the pool).
    """

    row: Array
    y: Array
    real: Array
    w_star: Array
    design_key: Array
    has_world: Array


class LinRegParams(NamedTuple):
    """A fitted model: w [d], plus the chain's world (w_star [d], design_key [2] uint32)."""

    w: Array
    w_star: Array
    design_key: Array


def _design(design_key: Array, num_points: int, dim: int) -> Array:
    """The chain's fixed design X [T, d] from its raw key."""
    return jax.random.normal(jax.random.wrap_key_data(design_key), (num_points, dim), _F)


def least_squares(x: Array, y: Array, ridge: float) -> Array:
    """argmin_w ||x w - y||^2 + ridge ||w||^2 for x [N, d], y [N] (Cholesky of the normal
    equations; d is small here and x^T x is well conditioned for N >= d + a few)."""
    gram = x.T @ x + ridge * jnp.eye(x.shape[1], dtype=x.dtype)  # [d, d]
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), x.T @ y)


def expected_param_error(
    policy: str,
    generations: int,
    *,
    dim: int,
    num_points: int,
    noise_std: float,
    sampling_bias: float = 1.0,
) -> np.ndarray:
    """E||w_n - w*||^2 for n = 0..generations-1 under OLS (module docstring). With a sampling
    bias lambda the synthetic u_k (k >= 1) have lambda times the variance of u_0:
    replace gives (1 + n lambda) x gen 0, accumulate (1 + lambda sum_{k=2}^{n+1} 1/k^2) x gen 0.

    Args:
      policy: "replace" or "accumulate" (each generation relabels the whole design once).
    Returns:
      [generations] float64.
    """
    if num_points - dim - 1 <= 0:
        return np.full(generations, np.inf)
    base = noise_std**2 * dim / (num_points - dim - 1)
    n = np.arange(1, generations + 1, dtype=np.float64)
    lam = sampling_bias
    if policy == "replace":
        return base * (1.0 + lam * (n - 1))
    if policy == "accumulate":
        return base * (1.0 + lam * (np.cumsum(1.0 / n**2) - 1.0))
    raise ValueError(f"no closed form for policy {policy!r}")


class LinearRegressionLearner(KnobbedLearner[LinRegParams, LinRegData]):
    """OLS / ridge refitted on its own relabelled design (jittable; one chain per call)."""

    jittable: ClassVar[bool] = True

    @property
    def _tdim(self) -> tuple[int, int]:
        return self.config.num_points, self.config.dim

    # --- real data ---------------------------------------------------------------------------
    def real_size(self, requested: int | None) -> int:
        """Generation 0 labels the whole design once: T points (`samples_per_generation` then
        sets how many relabelled rows later generations draw; null = T)."""
        return self.config.num_points

    def real_data(self, key: Array, num: int) -> LinRegData:
        """Draws the chain's world (w*, X) and real labels of `num` rows (cycling over the
        design; the loop asks for T)."""
        d = self.config.dim
        k_w, k_x, k_e = jax.random.split(key, 3)
        w_star = jax.random.normal(k_w, (d,), _F)
        design_key = jax.random.key_data(k_x)
        data = self._real_rows(k_e, num)
        return data._replace(w_star=w_star, design_key=design_key, has_world=jnp.bool_(True))

    def draw_real(self, key: Array, num: int | Array) -> LinRegData:
        """`num` fresh real labels, on the LAST `num` rows of the design, so that a mixed
        generation's synthetic share (first rows) and real share cover the design disjointly."""
        return self._real_rows(key, num, offset=self.config.num_points - num)

    def _real_rows(self, key: Array, num: int, offset: int = 0) -> LinRegData:
        t, d = self._tdim
        noise = self.config.noise_std * jax.random.normal(key, (num,), _F)
        return LinRegData(
            row=(offset + jnp.arange(num, dtype=jnp.int32)) % t,
            y=noise,
            real=jnp.ones((num,), bool),
            w_star=jnp.zeros((d,), _F),
            design_key=jnp.zeros((2,), jnp.uint32),
            has_world=jnp.bool_(False),
        )

    # --- the learner --------------------------------------------------------------------------
    def init(self, key: Array) -> LinRegParams:
        d = self.config.dim
        return LinRegParams(jnp.zeros((d,), _F), jnp.zeros((d,), _F), jnp.zeros((2,), jnp.uint32))

    def labelled(self, data: LinRegData) -> tuple[Array, Array]:
        """(x [N, d], y [N]) of a data set, real points labelled with the chain's w*."""
        x = _design(data.design_key, *self._tdim)[data.row]  # [N, d]
        y = jnp.where(data.real, x @ data.w_star + data.y, data.y)
        return x, y

    def fit(self, key: Array, data: LinRegData, params: LinRegParams, **kw: Any) -> LinRegParams:
        x, y = self.labelled(data)
        w = least_squares(x, y, self.config.ridge)
        return LinRegParams(w, data.w_star, data.design_key)

    def evaluate(self, key: Array, params: LinRegParams, reference: Any) -> dict[str, Array]:
        """`param_error` = ||w - w*||^2 (the noise-free test error for isotropic inputs) and
        `test_mse` on `test_points` fresh N(0, I) inputs with noisy labels."""
        k_x, k_e = jax.random.split(key)
        d = self.config.dim
        x = jax.random.normal(k_x, (self.config.test_points, d), _F)
        y = x @ params.w_star + self.config.noise_std * jax.random.normal(
            k_e, (self.config.test_points,), _F
        )
        err = params.w - params.w_star
        return {
            "param_error": jnp.sum(jnp.square(err)),
            "test_mse": jnp.mean(jnp.square(x @ params.w - y)),
        }

    knob_fields: ClassVar[frozenset[str]] = frozenset({"sampling_bias"})

    def knobs(self) -> dict[str, float]:
        """The synthetic labels' noise sd, noise_std sqrt(lambda) (traced in a sweep batch)."""
        return {"label_sd": float(self.config.noise_std * np.sqrt(self.config.sampling_bias))}

    def sample(self, key: Array, params: LinRegParams, num: int | Array, **kw: Any) -> LinRegData:
        """Relabels the design with the fit plus fresh noise: rows 0..num-1 (cycling: num = T
        relabels the design once)."""
        t, d = self._tdim
        rows = jnp.arange(num, dtype=jnp.int32) % t
        x = _design(params.design_key, t, d)[rows]
        sd = self.knob("label_sd")
        y = x @ params.w + sd * jax.random.normal(key, (num,), _F)
        return LinRegData(
            rows, y, jnp.zeros((num,), bool), params.w_star, params.design_key, jnp.bool_(True)
        )

    def log_prob(self, data: LinRegData, params: LinRegParams) -> Array:
        """[N] log-likelihood of each labelled point under y ~ N(x w, sigma^2), w = params.w."""
        x, y = self.labelled(data)
        return self._gauss(y - x @ params.w)

    def truth_log_prob(self, data: LinRegData) -> Array:
        """[N] log-likelihood of each labelled point under the true model y ~ N(x w*, sigma^2)
        (the selection scorer "truth")."""
        x, y = self.labelled(data)
        return self._gauss(y - x @ data.w_star)

    def _gauss(self, resid: Array) -> Array:
        s = self.config.noise_std
        return -0.5 * jnp.square(resid / s) - jnp.log(s) - 0.5 * np.log(2 * np.pi)

    # --- data algebra: only the point axes are pooled; the world is shared ------------------
    _POINTS = ("row", "y", "real")

    def subset(self, key: Array, data: LinRegData, num: int | Array) -> LinRegData:
        idx = jax.random.permutation(key, data.row.shape[0])[:num]
        return self.take(data, idx)

    def take(self, data: LinRegData, idx: Array) -> LinRegData:
        """The points `idx` [k] of `data` (same world)."""
        return data._replace(**{f: getattr(data, f)[idx] for f in self._POINTS})

    def concat(self, parts: list[LinRegData]) -> LinRegData:
        if len(parts) == 1:
            return parts[0]
        # The world of the pool: that of any part that carries one (draw_real's parts do not).
        w_star, design_key, has = parts[-1].w_star, parts[-1].design_key, parts[-1].has_world
        for p in reversed(parts[:-1]):
            w_star = jnp.where(p.has_world, p.w_star, w_star)
            design_key = jnp.where(p.has_world, p.design_key, design_key)
            has = has | p.has_world
        pts = {f: jnp.concatenate([getattr(p, f) for p in parts]) for f in self._POINTS}
        return LinRegData(**pts, w_star=w_star, design_key=design_key, has_world=has)

    def num_samples(self, data: LinRegData) -> int:
        return int(data.row.shape[0])
