"""The learner interface: what the generational loop needs from a model family.

A learner holds only its frozen config (it is hashable, so it can be a static argument of `jax.jit`)
and exposes pure functions of `(key, data, params)`. It knows nothing of generations; the loop in
`collapse_jax.loop` knows nothing of any model (Equinox's abstract/final pattern: concrete
learners are final and implement every abstract method).

Every method works on ONE chain. For `jittable` learners the loop vmaps the methods over
independent chains (trials) and scans them over generations; non-jittable learners (SGD
fine-tuning, beam search) run their chains one after the other in Python and receive a `workdir`
where they may keep resumable intermediate state (checkpoints, partially regenerated data).

The contract (issue 9): a learner owns its model, never the schedule. It is built as
`Learner(config, mesh=None)` and never sees the `GenerationConfig`: the loop alone owns the
mixing policies, the sample sizes and the keys, and tells the learner how many points to draw
(`real_data(key, num)`, `draw_real(key, num)`, `sample(key, params, num)`).

`AbstractLearner` is the core every learner implements. What only some learners offer is a
capability, declared by implementing a small protocol below, which the loop tests with
`isinstance`: a batched fit over chains (`BatchedFit`), used instead of vmapping `fit`;
state-independent sampling noise (`PresampledNoise`), drawn ahead for a block of generations;
log-likelihoods that likelihood filtering scores candidates by (`Scorable`); the provenance of
every point (`Provenance`: real, or the generation that wrote it); an estimate of a run's cost
(`Plannable`, `collapse-jax run --dry-run`) and its compiled programs, for the dry run's memory
plan (`HasPrograms`, for learners the loop does not compile: jittable learners are planned from
the loop's block programs); config fields passed traced so that sweep points
share compiled code (`Knobbed`, implemented by `KnobbedLearner`).

`Data` is any pytree the learner understands; the mixing policies only use `sample`, `subset`,
`draw_real`, `take` and `concat`, so a learner may represent data as raw points or as sufficient
statistics.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import jax
import numpy as np

from collapse_jax.jaxtools import prng
from collapse_jax.rundir import fileio

Params = TypeVar("Params")
Data = TypeVar("Data")
Metrics = dict[str, Any]


class AbstractLearner(abc.ABC, Generic[Params, Data]):
    """Anything that can be fit to data, evaluated and sampled from. Subclasses are final.

    Attributes:
      jittable: True if fit/evaluate/sample/subset/draw_real/concat are pure, jittable JAX
        functions with shapes fixed by their (static int) sizes; the loop then vmaps them over
        chains and scans them over generations.
      infinite_metrics: metrics allowed to be +-inf (never NaN); others must stay finite.
      static_sample_size: when False (only for jittable learners), sample sizes are passed as
        traced int32 scalars instead of Python ints, so a growing sample-size schedule needs no
        recompilation (e.g. the theory models' `exact` method, whose cost is independent of M).
    """

    jittable: ClassVar[bool] = False
    static_sample_size: ClassVar[bool] = True
    # Metrics that may legitimately be +-inf (a collapsed chain's log-determinant); any other
    # non-finite metric stops the run (`rundir.guard.check_finite`).
    infinite_metrics: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any, mesh: Any = None):
        """Args:
        config: the learner's frozen model config (`model:` block of the experiment).
        mesh: the experiment's frozen `sharding.MeshConfig` (None: all devices on the data
          axis), for learners that shard their work.
        """
        self.config = config
        self.mesh_config = mesh

    def _key(self) -> tuple:
        return (type(self), self.config, self.mesh_config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AbstractLearner) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # --- data of generation 0 and of the real distribution -------------------------------
    def real_size(self, requested: int | None) -> int:
        """Number of real points generation 0 trains on.

        Args:
          requested: the loop's M_0 (`generation.samples_per_generation`, or the schedule's first
            entry); None when the config leaves it to the learner.
        Returns:
          `requested` by default (learners that sample their real distribution at any size);
          learners with a data set of their own (images, text blocks) return its size.
        """
        if requested is None:
            raise ValueError(
                f"{type(self).__name__}: generation.samples_per_generation must be set (there is "
                "no real data set whose size could be used)"
            )
        return int(requested)

    def real_data(self, key: jax.Array, num: int | jax.Array) -> Data:
        """The generation-0 training data of one chain: `num` real points (`num` is what
        `real_size` returned, as an int or a traced int32 for `static_sample_size = False`).
        Default: `draw_real(key, num)`."""
        return self.draw_real(key, num)

    @abc.abstractmethod
    def draw_real(self, key: jax.Array, num: int | jax.Array) -> Data:
        """`num` fresh points of real data (new draws from the true distribution, or a random
        subset of the original data set) for the `gamma` share of a mixed generation."""

    def reference(self, key: jax.Array) -> Any:
        """Held-out real data that `evaluate` compares against (shared by all chains); None when
        the learner evaluates against a known distribution in closed form."""
        return None

    # --- the learner ------------------------------------------------------------------------
    @abc.abstractmethod
    def init(self, key: jax.Array) -> Params:
        """Starting parameters: the pretrained / base model, or a fresh initialisation."""

    @abc.abstractmethod
    def fit(self, key: jax.Array, data: Data, params: Params, **kwargs: Any) -> Params:
        """Fits the model to `data`, starting from `params` (ignored by closed-form learners).

        Non-jittable learners receive `workdir=pathlib.Path` in kwargs: a folder of their own for
        this generation's resumable state (None in a multi-process run), and `log=` a
        `rundir.events.StepLog` that learners training by steps report their steps to (its
        `progress` says whether to show progress bars)."""

    @abc.abstractmethod
    def evaluate(self, key: jax.Array, params: Params, reference: Any) -> Metrics:
        """Metrics of one chain's fitted model: a dict of scalars or fixed-shape arrays."""

    @abc.abstractmethod
    def sample(self, key: jax.Array, params: Params, num: int | jax.Array, **kwargs: Any) -> Data:
        """`num` synthetic points drawn from the fitted model (non-jittable: `workdir` and `log`
        kwargs, as `fit`'s)."""

    # --- data algebra used by the mixing policies -------------------------------------------
    def subset(self, key: jax.Array, data: Data, num: int | jax.Array) -> Data:
        """A uniformly random subset (without replacement) of `num` points of `data`.

        The default treats every leaf of `data` as an array of points along axis 0."""
        n = self.num_samples(data)
        if isinstance(num, int) and num > n:
            raise ValueError(f"cannot take {num} points from a data set of {n}")
        idx = jax.random.permutation(key, n)[:num]
        return jax.tree.map(lambda x: x[idx], data)

    def take(self, data: Data, idx: jax.Array) -> Data:
        """The points `idx` of `data` (likelihood filtering keeps its likeliest candidates with it).

        The default treats every leaf of `data` as an array of points along axis 0."""
        return jax.tree.map(lambda x: x[idx], data)

    def concat(self, parts: list[Data]) -> Data:
        """Pools data sets (default: concatenation of every leaf along axis 0)."""
        if len(parts) == 1:
            return parts[0]
        leaves = [jax.tree.leaves(p) for p in parts]
        treedef = jax.tree.structure(parts[0])
        is_np = all(isinstance(x, np.ndarray) for ls in leaves for x in ls)
        if not is_np:
            leaves = _computed(leaves)
        cat = np.concatenate if is_np else jax.numpy.concatenate
        return jax.tree.unflatten(treedef, [cat(xs, axis=0) for xs in zip(*leaves)])

    def num_samples(self, data: Data) -> int:
        """Number of points in `data` (default: length of the first leaf's axis 0)."""
        return int(jax.tree.leaves(data)[0].shape[0])

    # --- hooks (optional) ----------------------------------------------------------------------
    def prepare(self, run_dir: pathlib.Path, *, log: Any = None) -> None:
        """Called once when a run starts or resumes in `run_dir` (e.g. to save or check what
        the learner's data were built from, or to pretrain a base every generation starts
        from). `log`: where such a preparatory fit reports its steps (a `rundir.events.StepLog`
        of generation `events.BASE_GENERATION`), or None. Default: nothing."""

    def data_metrics(self, data: Data) -> Metrics:
        """Metrics of a generation's training data itself (merged into that generation's
        metrics; called for non-jittable learners). Default: none."""
        return {}

    # --- persistence (optional) ------------------------------------------------
    def save_params(self, path: pathlib.Path, params: Params) -> None:
        """Writes `params` into the (new, empty) folder `path`. Default: one .npz of the leaves."""
        fileio.save_tree(path / "params.npz", params)

    def load_params(self, path: pathlib.Path, template: Params) -> Params:
        """Reads what `save_params` wrote; `template` has the right tree structure."""
        return fileio.load_tree(path / "params.npz", template)


# ----------------------------------------------------------------------------------------------
# Capabilities: what only some learners offer. The loop tests them with `isinstance`.


@runtime_checkable
class BatchedFit(Protocol):
    """A batched fit over chains, used instead of vmapping `fit` (GMM compacts converged EM
    chains): called from Python (outside jit) once per generation; it may run host loops."""

    def fit_chains(self, keys: jax.Array, data: Any, params: Any) -> Any:
        """keys [R], data [R, ...], params [R, ...] (the fits' starts) -> params [R, ...]."""


@runtime_checkable
class PresampledNoise(Protocol):
    """A jittable learner's `sample` split into state-independent noise and a cheap transform.

    The loop draws generation g's noise from the chain's k_gens, stream
    `loop.keys.NOISE_STREAM + g` (no per-generation key derivation), a whole block of
    generations ahead of the scan (vectorised, computed once), in every entry point, and passes
    it as `sample(..., noise=that)`."""

    def sample_noise(self, key: jax.Array, num: int | jax.Array, stream: Any = 0) -> Any:
        """The pytree of random draws a synthetic draw of `num` points makes, independent of the
        params, from the words of `key`'s stream `stream` (`prng.word_source`; stream 0: what
        `sample(key, params, num)` draws itself)."""


@runtime_checkable
class Scorable(Protocol):
    """Log-likelihoods of data points, which likelihood filtering (`generation.likelihood_filter`)
    ranks synthetic candidates by."""

    def log_prob(self, data: Any, params: Any) -> jax.Array:
        """[N] log-likelihood of each point under the fitted model `params` (the scorer
        "generation0" scores under the chain's generation-0 fit)."""

    def truth_log_prob(self, data: Any) -> jax.Array:
        """[N] log-likelihood of each point under the real distribution (the scorer "truth")."""


@runtime_checkable
class Provenance(Protocol):
    """Data that record where each point came from (a non-jittable learner's): `sample` marks
    what it draws as new, and the sequential driver stamps the new points of every pool it draws
    with the generation whose model wrote them, so the record survives mixing, subsetting and
    resuming (it is part of the data and saved with them)."""

    def stamp(self, data: Any, generation: int) -> Any:
        """`data` with the points `sample` drew (not yet stamped) marked as written by
        `generation`; real points and earlier stamps unchanged."""


@runtime_checkable
class Plannable(Protocol):
    """An estimate of what a run will do (`collapse-jax run --dry-run`)."""

    def plan(self, cfg: Any) -> dict[str, Any]:
        """{name: value} for the experiment config `cfg` (e.g. "disk_bytes_estimate")."""


@runtime_checkable
class HasPrograms(Protocol):
    """The compiled programs of a generation, lowered without running them (the memory plan of
    `collapse-jax run --dry-run`; a non-jittable learner's own programs)."""

    def programs(self, cfg: Any) -> list[tuple[str, Callable[[], Any]]]:
        """[(name, a function returning the program's `jax.stages.Lowered`)] for `cfg`."""


@runtime_checkable
class Knobbed(Protocol):
    """Config fields passed to the computation as traced scalars (`KnobbedLearner`), so that
    the points of a sweep batch that differ in them share one compiled program."""

    knob_fields: ClassVar[frozenset[str]]

    def knobs(self) -> dict[str, float]: ...

    def bind(self, knobs: dict[str, Any]) -> Any: ...

    def canonical(self) -> Any: ...


class KnobbedLearner(AbstractLearner[Params, Data]):
    """A learner with knobs (`Knobbed`): config fields (e.g. "sampling_bias") that reach its
    computation only through `knob(name)`. Points of a sweep that differ in them share one
    compiled program, each point's knobs passed as traced float32 scalars (`loop.run_batch`,
    `bind`)."""

    # Config fields (e.g. "sampling_bias") that reach the computation only through `knobs()`.
    knob_fields: ClassVar[frozenset[str]] = frozenset()
    _bound: dict[str, Any] | None = None  # the traced knobs of a bound copy (`bind`)

    @abc.abstractmethod
    def knobs(self) -> dict[str, float]:
        """{name: value} of the float32 factors that `knob_fields` become, computed on the host
        exactly as the learner's own constants (so a bound, traced value gives the same bits)."""

    def bind(self, knobs: dict[str, Any]) -> KnobbedLearner:
        """A copy of this learner (used inside one trace only) whose `knob(name)` reads the
        traced scalars `knobs` instead of its config's constants."""
        new = copy.copy(self)
        new._bound = dict(knobs)
        return new

    def canonical(self) -> KnobbedLearner:
        """This learner with its `knob_fields` at their defaults: the jitted core's static
        argument when the knobs are passed traced, so runs that differ only in knobs share
        compiled code (their numbers come from the traced knobs alone)."""
        if not self.knob_fields:
            return self
        fields = dataclasses.fields(self.config)
        defaults = {f.name: f.default for f in fields if f.name in self.knob_fields}
        return type(self)(dataclasses.replace(self.config, **defaults), self.mesh_config)

    def knob(self, name: str) -> Any:
        """A knob's value: the traced scalar when bound (`bind`), else the Python constant."""
        return self.knobs()[name] if self._bound is None else self._bound[name]


def _computed(parts: list[list]) -> list[list]:
    """The leaves of every part but the largest, computed into buffers before concatenation.

    Fused into a concatenation (or a dynamic-update-slice), the parts' producers (a sampler's
    hashes and transforms) made LLVM's compile on XLA's CPU backend take tens of seconds (a 1-d
    Gaussian pool of 20 points per chain); as outputs of `prng.materialize`'s once-run loop
    they compile in well under a second (on other platforms `materialize` is the identity).
    The largest part, typically the pool carried from the previous generation and already a
    buffer, is left alone: copying it through the loop would double the concatenation's memory
    traffic. Only 32-bit leaves (what `materialize` carries) go through.
    """
    sizes = [sum(x.size for x in ls) for ls in parts]
    big = sizes.index(max(sizes))
    where = [
        (i, j)
        for i, ls in enumerate(parts)
        for j, x in enumerate(ls)
        if i != big and x.dtype.itemsize == 4
    ]
    if not where:
        return parts
    done = prng.materialize([parts[i][j] for i, j in where])
    out = [list(ls) for ls in parts]
    for (i, j), x in zip(where, done):
        out[i][j] = x
    return out
