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
(`real_data(key, num)`, `draw_real(key, num)`, `sample(key, params, num)`). A learner may offer a
batched fit over chains (`fit_chains`), which the loop then uses instead of vmapping `fit`, and
state-independent sampling noise (`sample_noise`), which the loop draws ahead for a block.

`Data` is any pytree the learner understands; the mixing policies only use `sample`, `subset`,
`draw_real` and `concat`, so a learner may represent data as raw points or as sufficient statistics.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import pathlib
from typing import Any, ClassVar, Generic, TypeVar

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

    # --- scalars that may differ between the points of one sweep batch ---------------------
    # Config fields (e.g. "sampling_bias") that reach the computation only through `knobs()`:
    # points of a sweep that differ in them share one compiled program, each point's knobs
    # passed as traced float32 scalars (`loop.run_batch`, `bind`).
    knob_fields: ClassVar[frozenset[str]] = frozenset()

    def knobs(self) -> dict[str, float]:
        """{name: value} of the float32 factors that `knob_fields` become, computed on the host
        exactly as the learner's own constants (so a bound, traced value gives the same bits)."""
        return {}

    def bind(self, knobs: dict[str, Any]) -> AbstractLearner:
        """A copy of this learner (used inside one trace only) whose `knob(name)` reads the
        traced scalars `knobs` instead of its config's constants."""
        new = copy.copy(self)
        new._bound = dict(knobs)
        return new

    def canonical(self) -> AbstractLearner:
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
        bound = getattr(self, "_bound", None)
        return self.knobs()[name] if bound is None else bound[name]

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
        this generation's resumable state."""

    # Optional batched fit over chains: `fit_chains(keys [R], data [R, ...], params [R, ...])`
    # -> params [R, ...], called from Python (outside jit) once per generation; it may run host
    # loops (GMM compacts converged chains). None: the loop vmaps `fit`.
    fit_chains: Any = None
    # Optional split of `sample` for jittable learners: `sample_noise(key, num, stream=0)` -> the
    # pytree of random draws that a synthetic draw makes, independent of the params, from the
    # words of `key`'s stream `stream` (`prng.word_source`; stream 0: what `sample(key, params,
    # num)` draws itself), or None where it does not apply; `sample(..., noise=that)` then uses
    # it. The loop draws generation g's noise from the chain's k_gens, stream
    # `loop.keys.NOISE_STREAM + g` (no per-generation key derivation), a whole block of
    # generations ahead of the scan (vectorised, computed once), in every entry point.
    sample_noise: Any = None

    @abc.abstractmethod
    def evaluate(self, key: jax.Array, params: Params, reference: Any) -> Metrics:
        """Metrics of one chain's fitted model: a dict of scalars or fixed-shape arrays."""

    @abc.abstractmethod
    def sample(self, key: jax.Array, params: Params, num: int | jax.Array, **kwargs: Any) -> Data:
        """`num` synthetic points drawn from the fitted model (non-jittable: `workdir` kwarg)."""

    # --- data algebra used by the mixing policies -------------------------------------------
    def subset(self, key: jax.Array, data: Data, num: int | jax.Array) -> Data:
        """A uniformly random subset (without replacement) of `num` points of `data`.

        The default treats every leaf of `data` as an array of points along axis 0."""
        n = self.num_samples(data)
        if isinstance(num, int) and num > n:
            raise ValueError(f"cannot take {num} points from a data set of {n}")
        idx = jax.random.permutation(key, n)[:num]
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
    def prepare(self, run_dir: pathlib.Path) -> None:
        """Called once when a run starts or resumes in `run_dir` (e.g. to save or check what
        the learner's data were built from). Default: nothing."""

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


def _computed(parts: list[list]) -> list[list]:
    """The leaves of every part but the largest, computed into buffers before concatenation.

    Fused into a concatenation (or a dynamic-update-slice), the parts' producers (a sampler's
    hashes and transforms) cost LLVM ~30 s per compile on XLA's CPU backend (a 1-d Gaussian pool
    of 20 points per chain); as outputs of `prng.materialize`'s once-run loop they compile in
    well under a second. The largest part, typically the pool carried from the previous
    generation and already a buffer, is left alone: copying it through the loop would double
    the concatenation's memory traffic. Only 32-bit leaves (what `materialize` carries) go through.
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
