"""Experiment configs: frozen dataclasses built from YAML files plus `a.b=value` overrides.

An experiment file mirrors `ExperimentConfig`:

```yaml
name: gaussian_unbiased
seed: 0
model: {kind: gaussian, dim: 1, estimator: unbiased}   # `kind` picks the learner's config class
generation: {num_generations: 100, samples_per_generation: 100, num_trials: 10000}
mesh: {data: -1}                                       # optional
```

A *suite* file (`experiments: [...]`) runs several experiments one after the other (the quickstart).
Unknown keys are errors naming the valid ones; overrides are parsed as YAML scalars and coerced to
the field's type; a key overridden twice is an error. String values may use `${VAR}` or
`${VAR:-default}` to read environment variables (e.g. the data folder).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.resources
import math
import os
import pathlib
import re
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

# kind -> (config class, learner class, reporting module). The classes are "module:attribute"; the
# reporting module draws the kind's own figures of a run and knows its closed-form curves
# (`collapse_jax.plots` calls its `figures` and `expected_curves`). All are imported lazily, so a
# theory-only run never imports Flax or transformers, and no run imports matplotlib before it plots.
MODEL_REGISTRY: dict[str, tuple[str, ...]] = {
    "discrete": (
        "collapse_jax.theory.discrete:DiscreteConfig",
        "collapse_jax.theory.discrete:DiscreteLearner",
        "collapse_jax.theory.figures",
    ),
    "gaussian": (
        "collapse_jax.theory.gaussian:GaussianConfig",
        "collapse_jax.theory.gaussian:GaussianLearner",
        "collapse_jax.theory.figures",
    ),
    "tails": (
        "collapse_jax.theory.tails:TailsConfig",
        "collapse_jax.theory.tails:TailsLearner",
        "collapse_jax.theory.tails_figures",
    ),
    "gmm": (
        "collapse_jax.gmm:GMMConfig",
        "collapse_jax.gmm:GMMLearner",
        "collapse_jax.gmm.figures",
    ),
    "linear_regression": (
        "collapse_jax.linreg.learner:LinearRegressionConfig",
        "collapse_jax.linreg.learner:LinearRegressionLearner",
        "collapse_jax.linreg.figures",
    ),
    "kde": (
        "collapse_jax.kde.learner:KDEConfig",
        "collapse_jax.kde.learner:KDELearner",
        "collapse_jax.kde.figures",
    ),
    "verification": (
        "collapse_jax.verification.learner:VerificationConfig",
        "collapse_jax.verification.learner:VerificationLearner",
        "collapse_jax.verification.figures",
    ),
    "vae": (
        "collapse_jax.vae.model:VAEConfig",
        "collapse_jax.vae.learner:VAELearner",
        "collapse_jax.vae.figures",
    ),
    "opt": (
        "collapse_jax.lm.experiment:OPTExperimentConfig",
        "collapse_jax.lm.experiment:OPTLearner",
        "collapse_jax.lm.figures",
    ),
    # The known-language baselines: the truth itself and the exact count learner, in the LM
    # experiment's loop with its data, decoders and metrics.
    "oracle": (
        "collapse_jax.lm.experiment:OracleExperimentConfig",
        "collapse_jax.lm.experiment:OPTLearner",
        "collapse_jax.lm.figures",
    ),
    "ngram": (
        "collapse_jax.lm.experiment:NgramExperimentConfig",
        "collapse_jax.lm.experiment:OPTLearner",
        "collapse_jax.lm.figures",
    ),
}


# Kinds whose learner has a real data set of its own (a design of `num_points` rows, a data set
# of `num_points` points, MNIST's training images, the LM's training blocks): for them a
# `generation:` block that sets neither `samples_per_generation` nor `sample_schedule` means "the
# size of the real data" (null), not the class default 100, which would silently relabel 100
# rows of a 50-row design or fit 200 real points at generation 0 and 100 afterwards.
REAL_DATA_SET_KINDS = frozenset({"linear_regression", "kde", "vae", "opt", "oracle", "ngram"})


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


class MissingExtra(ImportError):
    """What a config asks for needs an optional dependency that is not installed; the message
    names it and the `pip install` line (the CLI prints it as one line, exit code 2)."""


def require(ok: bool, key: str, message: str) -> None:
    """Raises `ConfigError("<key>: <message>")` unless `ok` (the validation of every config)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def import_object(path: str) -> Any:
    """The object a "module:attribute" path names (the form of `MODEL_REGISTRY`), imported."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def model_config_class(kind: str) -> type:
    if kind not in MODEL_REGISTRY:
        raise ConfigError(
            f"unknown model kind {short(kind)}; valid kinds: {sorted(MODEL_REGISTRY)}"
        )
    return import_object(MODEL_REGISTRY[kind][0])


def learner_class(kind: str) -> type:
    if kind not in MODEL_REGISTRY:
        raise ConfigError(
            f"unknown model kind {short(kind)}; valid kinds: {sorted(MODEL_REGISTRY)}"
        )
    return import_object(MODEL_REGISTRY[kind][1])


def reporting_module(kind: str) -> types.ModuleType | None:
    """The kind's reporting module, or None for a kind registered without one (a test's toy).

    A reporting module defines `figures(learner, run, out_dir) -> list[Path]` (the kind's own
    figures of a finished run) and `expected_curves(model_config, mode, sample_sizes, *,
    filtered=False, generation=None) -> {metric: [G] array}` (closed-form chain means under the
    policy `mode`; `generation`: the run's `generation:` block, for the mix shares and whatever
    else a closed form assumes; empty where the run does not match its assumptions).
    """
    if kind not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds: {sorted(MODEL_REGISTRY)}")
    entry = MODEL_REGISTRY[kind]
    return importlib.import_module(entry[2]) if len(entry) > 2 else None


# ----------------------------------------------------------------------------------------------
# The config dataclasses owned by the loop.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LikelihoodFilterConfig:
    """Likelihood filtering of synthetic data, applied by `collapse_jax.loop.filtering`: keeps
    the likeliest samples, which trims the tails (a sampling-bias effect); not the label
    verification of Feng et al. 2024 (`model.kind: verification`).

    Attributes:
      rho: keep ratio in (0, 1]: each generation draws ceil(M / rho) candidates and keeps the M
        that the scorer ranks best (1 = no filtering).
      scorer: "truth": log-likelihood under the real distribution (learners with
        `truth_log_prob`); "generation0": log-likelihood under the chain's generation-0 fitted
        model (learners with `log_prob`; jittable learners).
    """

    rho: float = 1.0
    scorer: Literal["truth", "generation0"] = "truth"

    def __post_init__(self):
        require(
            0.0 < self.rho <= 1.0,
            "generation.likelihood_filter.rho",
            f"must lie in (0, 1] (got {self.rho})",
        )
        require(
            self.scorer in ("truth", "generation0"),
            "generation.likelihood_filter.scorer",
            f"{short(self.scorer)} is not 'truth' or 'generation0'",
        )


# The parts a `GenerationConfig` field can play in the loop's compiled program (`batch_role`):
# "compiled" is compiled in (runs differing in it cannot share a program); "policy" is read only
# through the schedule's `Policy` (which parts exist, itself part of the program); "size" sets
# sample sizes or mix shares, traced values for learners whose sample sizes are traced and
# compiled in otherwise.
BATCH_ROLES = ("compiled", "policy", "size")


def batch_role(role: str, default: Any) -> Any:
    """A dataclass field with `default` whose part in the compiled program is `role` (one of
    `BATCH_ROLES`), kept in the field's metadata under "batch"."""
    if role not in BATCH_ROLES:
        raise ValueError(f"batch role must be one of {BATCH_ROLES}, got {role!r}")
    return dataclasses.field(default=default, metadata={"batch": role})


def batch_roles(cls: type) -> dict[str, str]:
    """{field name: batch role} of the dataclass `cls`; every field must declare one."""
    roles = {f.name: f.metadata.get("batch") for f in dataclasses.fields(cls)}
    missing = sorted(name for name, role in roles.items() if role is None)
    if missing:
        raise TypeError(
            f"{cls.__name__} fields without a batch role (declare one with "
            f"config.batch_role): {', '.join(missing)}"
        )
    return roles


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GenerationConfig:
    """How generations are chained (DESIGN.md: fit -> evaluate -> sample -> mix).

    Attributes:
      num_generations: G, number of models fitted; generation 0 is fitted to real data.
      samples_per_generation: M_0, size of each generation's training set; None = the size of
        the real data set (the language model regenerates its whole training set), which is
        also what a config of a kind with a real data set of its own gets when it sets neither
        this nor `sample_schedule` (`REAL_DATA_SET_KINDS`: linear regression, KDE, VAE, LM);
        100 for the others (Gaussian, discrete: no natural size; GMM: `model.real_size`).
      sample_growth: M_n = round(M_0 * (n + 1) ** sample_growth); 0 keeps M constant, > 1 is the
        super-linear growth the paper says is needed to bound the error.
      sample_schedule: explicit M_n for every generation (overrides the two fields above).
      policy: "replace" (alpha = 1: train only on the last model's samples), "mix" (the paper's
        alpha/beta/gamma fractions), "accumulate" (keep all data of all generations, Gerstgrasser
        et al. 2024), "accumulate_subsample" (keep all data, but fit each generation on a
        uniformly random subset of M_n points of everything so far, Kazdan et al. 2024).
      real_data: how the gamma share of real data of a "mix" generation is drawn: "fresh" (new
        draws from the real distribution each generation) or "fixed" (a random subset of the
        chain's generation-0 real data set; Alemohammad et al. 2023's fixed real set).
      alpha: share of new synthetic data ("mix").
      beta: share of the previous generation's training data ("mix").
      gamma: share of original real data ("mix"; the paper's LM runs keep 0.1). With beta = 0,
        alpha / gamma is Bertrand et al. (2024)'s synthetic-to-real ratio (their lambda; here
        `lambda_B`), not MAD's sampling bias `model.sampling_bias` (`lambda_MAD`).
      num_trials: R independent chains (vmapped for jittable learners).
      chunk_size: chains processed at once; bounds device memory for 10^6+ chains.
      block_size: generations per jitted scan and per checkpoint of jittable learners.
      init_from: where each generation's fit starts: "base" (the learner's init, e.g. the
        pretrained model, as in the paper), "previous" (last generation's fit) or "scratch"
        (a fresh init with a new key).
      record_trials: per-chain metric values are kept for this many chains (arrays/*.npz).
      keep_params: "all" keeps every generation's fitted parameters in `params/`, "first_last"
        generation 0's and the newest (what the figures need: the paper's histograms score every
        generation's data under the generation-0 model), "last" only the newest (in `state/`).
      likelihood_filter: keep the synthetic points most likely under a scorer (None: keep
        every point). Likelihood filtering, not verification: it trims the tails.
    """

    # Each field declares its part in a compiled program (`batch_role`), which the sweep's
    # `loop.batch_key` reads: a new field must say whether runs differing in it can share one.
    num_generations: int = batch_role("compiled", 10)
    samples_per_generation: int | None = batch_role("size", 100)
    sample_growth: float = batch_role("size", 0.0)
    sample_schedule: tuple[int, ...] | None = batch_role("size", None)
    policy: Literal["replace", "mix", "accumulate", "accumulate_subsample"] = batch_role(
        "policy", "replace"
    )
    real_data: Literal["fixed", "fresh"] = batch_role("policy", "fresh")
    alpha: float = batch_role("size", 1.0)
    beta: float = batch_role("size", 0.0)
    gamma: float = batch_role("size", 0.0)
    num_trials: int = batch_role("compiled", 1)
    chunk_size: int = batch_role("compiled", 65536)
    block_size: int = batch_role("compiled", 50)
    init_from: Literal["base", "previous", "scratch"] = batch_role("policy", "base")
    record_trials: int = batch_role("compiled", 256)
    keep_params: Literal["all", "first_last", "last"] = batch_role("compiled", "last")
    likelihood_filter: LikelihoodFilterConfig | None = batch_role("policy", None)

    def __post_init__(self):
        require(self.num_generations >= 1, "generation.num_generations", "must be >= 1")
        if self.samples_per_generation is not None:
            require(
                self.samples_per_generation >= 2,
                "generation.samples_per_generation",
                f"must be >= 2 (got {self.samples_per_generation})",
            )
        require(
            math.isfinite(self.sample_growth) and self.sample_growth >= 0,
            "generation.sample_growth",
            "must be a finite number >= 0",
        )
        if self.sample_schedule is not None:
            require(
                len(self.sample_schedule) >= self.num_generations,
                "generation.sample_schedule",
                f"has {len(self.sample_schedule)} entries, needs num_generations="
                f"{self.num_generations}",
            )
            require(
                all(m >= 2 for m in self.sample_schedule),
                "generation.sample_schedule",
                "every sample size must be >= 2",
            )
        check_policy(self.policy, self.alpha, self.beta, self.gamma, self.real_data)
        require(self.num_trials >= 1, "generation.num_trials", "must be >= 1")
        require(self.chunk_size >= 1, "generation.chunk_size", "must be >= 1")
        require(self.block_size >= 1, "generation.block_size", "must be >= 1")
        require(self.record_trials >= 0, "generation.record_trials", "must be >= 0")

    def smallest_sample_size(self) -> int | None:
        """min over n >= 1 of M_n (None when M depends on the real data set's size)."""
        if self.sample_schedule is not None:
            return min(self.sample_schedule[1 : self.num_generations], default=None)
        return self.samples_per_generation  # M_n grows with n (sample_growth >= 0)

    def sample_size(self, generation: int, real_size: int) -> int:
        """M_n: size of generation n's training set (n = 0 is the real data)."""
        if self.sample_schedule is not None:
            return int(self.sample_schedule[generation])
        m0 = real_size if self.samples_per_generation is None else self.samples_per_generation
        return max(2, int(round(m0 * (generation + 1) ** self.sample_growth)))

    def shares(self, num: int) -> tuple[int, int, int]:
        """Splits `num` points into (synthetic, previous, real) counts by largest remainder."""
        return split_shares(num, self.policy, (self.alpha, self.beta, self.gamma))


def check_policy(policy: str, alpha: float, beta: float, gamma: float, real_data: str) -> None:
    """Checks a mixing policy and its shares (`GenerationConfig`'s fields of the same names);
    raises `ConfigError` naming the offending field."""
    shares = {"alpha": alpha, "beta": beta, "gamma": gamma}
    for name, v in shares.items():
        require(0.0 <= v <= 1.0, f"generation.{name}", f"must lie in [0, 1] (got {v})")
    require(
        policy in ("replace", "mix", "accumulate", "accumulate_subsample"),
        "generation.policy",
        f"{short(policy)} is not replace, mix, accumulate or accumulate_subsample",
    )
    require(
        real_data in ("fixed", "fresh"),
        "generation.real_data",
        f"{short(real_data)} is not fixed or fresh",
    )
    if policy == "replace":
        # alpha/beta/gamma only act under "mix": given with "replace" they would be ignored.
        ignored = [
            f"{n}={shares[n]}"
            for n, default in (("alpha", 1.0), ("beta", 0.0), ("gamma", 0.0))
            if shares[n] != default
        ]
        require(
            not ignored,
            "generation.policy",
            f"is 'replace' (train on synthetic data only), which ignores {', '.join(ignored)};"
            " use policy: mix to mix data",
        )
    if policy == "mix":
        total = alpha + beta + gamma
        require(
            abs(total - 1.0) < 1e-9,
            "generation.alpha/beta/gamma",
            f"must sum to 1 (got {alpha} + {beta} + {gamma} = {total})",
        )
        require(
            alpha > 0,
            "generation.alpha",
            "must be > 0: a generation without synthetic data does not chain models",
        )


def split_shares(num: int, policy: str, fracs: tuple[float, float, float]) -> tuple[int, int, int]:
    """(synthetic, previous, real) counts of `num` points: all synthetic unless `policy` is "mix",
    whose `fracs` (alpha, beta, gamma) are rounded by largest remainder."""
    if policy != "mix":
        return num, 0, 0
    counts = [int(math.floor(f * num)) for f in fracs]
    order = sorted(range(3), key=lambda i: fracs[i] * num - counts[i], reverse=True)
    for i in order[: num - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ReportConfig:
    """`report:` the page a run writes for people when it ends (`collapse-jax report`).

    No result depends on it: a run may resume with it changed (`rundir.commits.FREE_KEYS`).

    Attributes:
      enabled: write `<run>/report.html` when the run finishes (a failure to write it is a
        one-line warning, never a failed run).
    """

    enabled: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MeshConfig:
    """Mesh axis sizes as they appear in a config's `mesh:` block (`sharding.make_mesh` takes it).

    Attributes:
      data: data-parallel replicas (batch split, parameters replicated).
      fsdp: fully-sharded data parallelism (batch split, parameters and optimizer state split).
      tensor: tensor (model) parallelism (heads / MLP / vocab split).
    One of the three may be -1: it takes every device the others leave.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        require(all(s == -1 or s >= 1 for s in sizes), "mesh", f"sizes must be >= 1 or -1: {sizes}")
        require(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis may be -1")

    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WandbConfig:
    """The Weights & Biases sink of a `logging:` block (`rundir.events.WandbSink`).

    Attributes:
      enabled: log to a wandb run in `<run>/wandb/` (needs the `wandb` extra).
      project: the wandb project.
      mode: "offline" (no network; `wandb sync` uploads later), "online" or "disabled".
    """

    enabled: bool = False
    project: str = "collapse-jax"
    mode: str = "offline"

    def __post_init__(self):
        require(
            self.mode in ("offline", "online", "disabled"),
            "logging.wandb.mode",
            f"{short(self.mode)} is not 'offline', 'online' or 'disabled'",
        )
        require(bool(self.project), "logging.wandb.project", "must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LoggingConfig:
    """What a run reports while it runs (`rundir.events`); it never changes results, and a run
    may resume with other settings.

    Attributes:
      every_steps: write a training-step record to metrics.jsonl (and the sinks) every this many
        optimizer steps of a fit (and at its last step).
      progress: progress bars of generations, training steps and regeneration batches: "auto"
        (when stderr is a terminal), true or false; `--no-progress` turns them off either way.
      tensorboard: also write TensorBoard event files to `<run>/tensorboard/` (needs the
        `tensorboard` extra: tensorboardX).
      wandb: the Weights & Biases sink (off by default).
    """

    every_steps: int = 10
    progress: Any = "auto"
    tensorboard: bool = False
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def __post_init__(self):
        require(
            self.every_steps >= 1, "logging.every_steps", f"must be >= 1 (got {self.every_steps})"
        )
        require(
            isinstance(self.progress, bool) or self.progress == "auto",
            "logging.progress",
            f"must be auto, true or false (got {short(self.progress)})",
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """One experiment: a learner, how its generations are chained, and where it runs.

    Attributes:
      name: run name (folder name under the output directory).
      seed: the one seed every random number of the run derives from.
      model: the learner's config; its class is chosen by the YAML `kind:` key.
      generation: the generational loop's settings.
      report: the HTML page written at the end of the run (changes no result).
      mesh: device mesh for sharded learners (None: all devices on the data axis).
      logging: what the run reports while it runs (metrics.jsonl, progress bars, sinks).
    """

    name: str
    seed: int = 0
    model: Any
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    mesh: MeshConfig | None = None
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        require(
            isinstance(self.name, str)
            and bool(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", self.name)),
            "name",
            "must be a plain file name (letters, digits, _ . -, not starting with a dot: it "
            f"names a folder), got {short(self.name)}",
        )
        require(dataclasses.is_dataclass(self.model), "model", "must be a model config")
        require(0 <= self.seed < 2**63, "seed", "must be a non-negative integer")
        check_float_range(self.model, "model")
        # The smallest training set must be able to fit the model (e.g. a GMM's components).
        # `min_points` is an optional property of model configs.
        need = getattr(self.model, "min_points", None)
        smallest = self.generation.smallest_sample_size()
        if need is not None and smallest is not None:
            require(
                smallest >= need,
                "generation.samples_per_generation",
                f"a generation would be fitted to {smallest} points, but this model needs at "
                f"least {need} to fit",
            )

        # A warm start (Bertrand et al.'s setting) must reach the fit: `previous_fit_ignored` is
        # an optional property of model configs, the reason a fit would not start from it.
        ignored = getattr(self.model, "previous_fit_ignored", None)
        require(
            self.generation.init_from != "previous" or not ignored,
            "generation.init_from",
            f"'previous' would be ignored: {ignored}",
        )

    @property
    def kind(self) -> str:
        return self.model.kind


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SuiteConfig:
    """Several experiments run one after the other (e.g. the quickstart)."""

    name: str
    experiments: tuple[ExperimentConfig, ...]

    def __post_init__(self):
        require(len(self.experiments) >= 1, "experiments", "needs at least one experiment")
        names = [e.name for e in self.experiments]
        require(len(set(names)) == len(names), "experiments", f"names must be unique: {names}")


# ----------------------------------------------------------------------------------------------
# Numeric range of model settings in the dtype the model computes in.

_DTYPE_FIELDS = ("compute_dtype", "param_dtype", "dtype")


def compute_dtype(model_cfg: Any) -> str:
    """The float dtype a model config's numbers are used in: its `compute_dtype`,
    `param_dtype` or `dtype` field where it has one, else float32 (JAX's default)."""
    return _own_dtype(model_cfg) or "float32"


def _own_dtype(block: Any) -> str | None:
    """The float dtype a config block names in one of `_DTYPE_FIELDS`, if any."""
    import ml_dtypes

    for name in _DTYPE_FIELDS:
        value = getattr(block, name, None)
        if isinstance(value, str):
            try:
                ml_dtypes.finfo(value)
            except (TypeError, ValueError):
                continue  # not a float dtype (e.g. a token dtype)
            return value
    return None


def _floats(value: Any, where: str):
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _floats(v, f"{where}[{i}]")


def check_float_range(model_cfg: Any, where: str = "model", dtype: str | None = None) -> None:
    """Every float setting of a model config must be a normal number of its compute dtype.

    A value valid in float64 can overflow to inf (1e39 in float32) or fall below the smallest
    normal number and lose precision or flush to zero (1e-42), giving NaN or zero metrics later.
    A field whose value never enters the model's computation may opt out with
    `dataclasses.field(metadata={"dtype": "float64"})`.
    """
    import ml_dtypes  # a JAX dependency; knows bfloat16 as well as the numpy dtypes

    # A block naming its own dtype uses it; nested blocks inherit their parent's.
    default = _own_dtype(model_cfg) or dtype or "float32"
    for f in dataclasses.fields(model_cfg):
        value = getattr(model_cfg, f.name)
        if dataclasses.is_dataclass(value):  # nested blocks (the LM's model/train/decode)
            check_float_range(value, f"{where}.{f.name}", default)
            continue
        field_dtype = f.metadata.get("dtype", default)
        info = ml_dtypes.finfo(field_dtype)
        for key, v in _floats(value, f"{where}.{f.name}"):
            require(
                math.isfinite(v) and abs(v) <= float(info.max),
                key,
                f"{short(v)} is out of range for {field_dtype}, the dtype this model computes in "
                f"(largest {float(info.max):.4g})",
            )
            require(
                v == 0 or abs(v) >= float(info.tiny),
                key,
                f"{short(v)} is below the smallest normal {field_dtype} number "
                f"({float(info.tiny):.4g}): "
                "it would lose precision or become 0",
            )


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts.

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Expanded(str):
    """A string read with `${VAR}` expanded; `.template` keeps the text as written.

    It compares and hashes as the expanded string (configs stay equal whatever the template),
    while the run directory stores the template: moving a data folder named by `${VAR}` does not
    make a resumed run look like a different config (`to_dict(cfg, expand=False)`).
    """

    __slots__ = ("template",)

    def __new__(cls, value: str, template: str):
        obj = super().__new__(cls, value)
        obj.template = template
        return obj

    def __reduce__(self):  # pickle / deepcopy keep the template
        return (Expanded, (str(self), self.template))


def expand_env(value: str, where: str) -> str:
    """`value` with every `${VAR}` / `${VAR:-default}` replaced from the environment (an
    `Expanded` string when anything changed); an unset variable without a default is a
    ConfigError naming `where`."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {var} is not set")

    template = value.template if isinstance(value, Expanded) else value
    expanded = _ENV.sub(sub, template)
    return Expanded(expanded, template) if expanded != template else expanded


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Converts a YAML value to the annotated field type `tp`, or raises ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: invalid value {short(value)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {short(value)} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {short(value)}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)  # int(.inf) would raise OverflowError
            or value != int(value)
        ):
            raise ConfigError(f"{where}: expected an integer, got {short(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return _coerce(float, float(value), where)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {short(value)}")
        if math.isnan(value):
            raise ConfigError(f"{where}: expected a number, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short(value)}")
        return expand_env(value, where)
    raise ConfigError(f"{where}: unsupported field type {tp}")


# Keys that were renamed: {class name: {old key: new key}}. The old key is refused with one
# line naming the new one (no silent alias: what it did was not what its old name said).
RENAMED_KEYS: dict[str, dict[str, str]] = {
    # It keeps the likeliest synthetic samples: likelihood filtering, not Feng et al.'s
    # verification (`model.kind: verification`).
    "GenerationConfig": {"selection": "likelihood_filter"},
}


def build(cls: type, raw: Mapping[str, Any] | None, where: str = "") -> Any:
    """Builds the frozen dataclass `cls` from a plain mapping, rejecting unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a section (a mapping), got {short(raw)}")
    raw = dict(raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for old_key, new_key in RENAMED_KEYS.get(cls.__name__, {}).items():
        require(old_key not in raw, f"{prefix}{old_key}", f"renamed {prefix}{new_key}")
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys of {where or 'the root'}: "
            f"{sorted(fields)}"
        )
    if cls is ExperimentConfig:
        raw = _real_size_default(raw)
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if name == "model" and cls is ExperimentConfig:
            kwargs[name] = _build_model(value, f"{prefix}model")
        elif name == "experiments" and cls is SuiteConfig:
            if not isinstance(value, list):
                raise ConfigError(f"{prefix}experiments: expected a list of experiments")
            kwargs[name] = tuple(
                build(ExperimentConfig, v, f"{prefix}experiments[{i}]") for i, v in enumerate(value)
            )
        else:
            value = _over_default(fields[name], value)
            kwargs[name] = _coerce(tp, value, f"{prefix}{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _real_size_default(raw: dict) -> dict:
    """An experiment's raw block with `generation.samples_per_generation: null` (the size of the
    real data) where its kind has a real data set of its own (`REAL_DATA_SET_KINDS`) and the
    block sets no size."""
    model = raw.get("model")
    kind = model.get("kind") if isinstance(model, Mapping) else None
    gen = raw.get("generation", {})
    if kind not in REAL_DATA_SET_KINDS or not isinstance(gen, Mapping):
        return raw
    if "samples_per_generation" in gen or "sample_schedule" in gen:
        return raw
    return {**raw, "generation": {**gen, "samples_per_generation": None}}


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A partial nested block laid over the field's default block, not over the class defaults.

    E.g. the LM experiment's `decode:` defaults to the paper's beam search; `model.decode.
    num_beams=2` must change only the beams, not reset the repetition penalty to the class
    default. Blocks of another `kind` than the default's are taken as given.
    """
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    base = to_dict(default)
    if "kind" in value and value["kind"] != base.get("kind", value["kind"]):
        return value
    return _deep_merge(base, value)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _build_model(raw: Any, where: str) -> Any:
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ConfigError(f"{where}: needs a `kind:` key, one of {sorted(MODEL_REGISTRY)}")
    raw = dict(raw)
    kind = raw.pop("kind")
    try:
        cls = model_config_class(kind)
    except ConfigError as e:
        raise ConfigError(f"{where}.kind: {e}") from None
    return build(cls, raw, where)


def to_dict(cfg: Any, *, expand: bool = True) -> Any:
    """The plain-YAML form of a config (inverse of `build`; includes every default).

    Args:
      expand: False writes strings read from `${VAR}` as written (what a run directory stores).
    """
    if dataclasses.is_dataclass(cfg):
        out = {}
        kind = getattr(type(cfg), "kind", None)
        if isinstance(kind, str):
            out["kind"] = kind
        for f in dataclasses.fields(cfg):
            if f.init:
                out[f.name] = to_dict(getattr(cfg, f.name), expand=expand)
        return out
    if isinstance(cfg, tuple):
        return [to_dict(v, expand=expand) for v in cfg]
    if isinstance(cfg, Expanded):  # a plain str either way: yaml.safe_dump rejects subclasses
        return str(cfg) if expand else cfg.template
    return cfg


def dump(cfg: Any, *, expand: bool = True) -> str:
    """YAML text of a resolved config, loadable again with `load_config`."""
    return yaml.safe_dump(
        to_dict(cfg, expand=expand), sort_keys=False, default_flow_style=None, width=100
    )


# ----------------------------------------------------------------------------------------------
# Loading files and overrides.


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parses `a.b=value` strings (values as YAML scalars/flow lists); duplicates are errors."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {short(item)} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"override key {short(key)} is not a dotted name")
        if key in out:
            raise ConfigError(f"config key {key} is overridden twice")
        out[key] = parse_yaml(text, f"override {key}") if text.strip() else ""
    return out


def _apply(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not an index")
            node = node[int(p)]
            continue
        if p not in node or node[p] is None:
            node[p] = {}
        if not isinstance(node[p], (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = node[p]
    if isinstance(node, list):
        raise ConfigError(f"override {key}: cannot replace a whole list item")
    node[parts[-1]] = value


class ConfigFileNotFound(ConfigError, FileNotFoundError):
    """The config file does not exist (a usage error: exit code 2)."""


# Values shown in error messages are cut to a few dozen characters (a value may be huge, e.g.
# the expansion of YAML aliases).
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def short(value: Any) -> str:
    """`repr(value)`, truncated for an error message."""
    return _SHORT.repr(value)


# A config expands to at most this many YAML nodes once aliases are resolved: a few aliases are
# fine, an "alias bomb" (each level repeating the one before) is refused before it is built.
MAX_YAML_NODES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int], visiting: set[int], where: str) -> int:
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in visiting:
        raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive structure)")
    visiting.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, visiting, where)
        if size > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: its YAML aliases expand to more than {MAX_YAML_NODES} values; "
                "write the values out instead of repeating aliases"
            )
    visiting.discard(id(node))
    memo[id(node)] = size
    return size


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {short(key)} is given twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data; duplicate keys and syntax errors are ConfigErrors naming `where`."""
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()  # the node graph: an alias is one shared node
            if node is None:
                return None
            _expanded_size(node, {}, set(), where)  # before anything is expanded
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_raw(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigFileNotFound(f"config file {what}: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return raw


def from_dict(raw: dict, overrides: Sequence[str] = ()) -> ExperimentConfig | SuiteConfig:
    """Builds an experiment (or suite) config from a plain dict plus `a.b=value` overrides."""
    raw = copy.deepcopy(raw)
    parsed = parse_overrides(overrides)
    if "experiments" in raw:
        for key, value in parsed.items():
            if key == "name" or key.startswith("experiments."):
                _apply(raw, key, value)
            else:  # an unqualified override applies to every experiment of the suite
                for exp in raw["experiments"]:
                    _apply(exp, key, value)
        return build(SuiteConfig, raw)
    for key, value in parsed.items():
        _apply(raw, key, value)
    return build(ExperimentConfig, raw)


# Holds the shipped configs' folder open for the process (a no-op for an ordinary install, where
# the folder is a real directory; importlib.resources extracts it otherwise).
_RESOURCES = contextlib.ExitStack()
atexit.register(_RESOURCES.close)


@functools.cache
def shipped_config_dir() -> pathlib.Path:
    """The configs shipped inside the package (`collapse_jax/configs/`), as a folder."""
    root = importlib.resources.files("collapse_jax").joinpath("configs")
    return pathlib.Path(_RESOURCES.enter_context(importlib.resources.as_file(root)))


def find_config(name: str | os.PathLike) -> pathlib.Path:
    """The config file `name` names: a file path as given, else a shipped config.

    A shipped config is named relative to `collapse_jax/configs/`, with or without `.yaml`
    (`quickstart`, `lm/truth_markov_beam`); a leading `configs/` is dropped too, so the
    repository paths of earlier versions (`configs/lm/truth_markov_beam.yaml`) work from any
    directory.

    Raises:
      ConfigFileNotFound: neither exists (one line naming `name`).
    """
    path = pathlib.Path(name)
    if path.is_file():
        return path
    rel = pathlib.PurePosixPath(path.as_posix())
    if rel.parts[:1] == ("configs",) and len(rel.parts) > 1:
        rel = pathlib.PurePosixPath(*rel.parts[1:])
    if rel.parts and not rel.is_absolute() and ".." not in rel.parts:
        root = shipped_config_dir()
        for cand in (root.joinpath(*rel.parts), root.joinpath(*rel.parts[:-1], rel.name + ".yaml")):
            if cand.is_file():
                return cand
    raise ConfigFileNotFound(f"config file not found: {name}")


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ExperimentConfig | SuiteConfig:
    """Loads a YAML config file (see `find_config` for shipped ones) plus `a.b=value` overrides
    into frozen, validated dataclasses."""
    raw = load_raw(path)  # its errors name the file already
    try:
        return from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
