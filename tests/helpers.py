"""Test-only learners for the generational loop (never imported by the package)."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.loop.learner import AbstractLearner
from collapse_jax.rundir import fileio


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ToyConfig:
    kind: ClassVar[str] = "toy"
    mean: float = 0.0
    std: float = 1.0


class ToyGaussianLearner(AbstractLearner):
    """1-D Gaussian fitted by MLE to raw points; jittable."""

    jittable = True

    def draw_real(self, key, num):
        return self.config.mean + self.config.std * jax.random.normal(key, (num,))

    def init(self, key):
        return {"mu": jnp.zeros(()), "var": jnp.ones(())}

    def fit(self, key, data, params, **kw):
        return {"mu": data.mean(), "var": data.var()}

    def evaluate(self, key, params, reference):
        return {
            "var": params["var"],
            "mu": params["mu"],
            "pair": jnp.stack([params["mu"], params["var"]]),
        }

    def sample(self, key, params, num, **kw):
        return params["mu"] + jnp.sqrt(params["var"]) * jax.random.normal(key, (num,))


class ToyNumpyLearner(AbstractLearner):
    """The same model on NumPy arrays, run in Python (the non-jittable path)."""

    jittable = False
    calls: ClassVar[list] = []

    def draw_real(self, key, num):
        return np.asarray(self.config.mean + self.config.std * jax.random.normal(key, (num,)))

    def init(self, key):
        # float32, as `fit` returns: a resumed run loads fitted params with this as template
        return {"mu": np.zeros((), np.float32), "var": np.ones((), np.float32)}

    def fit(self, key, data, params, *, workdir=None, **kw):
        ToyNumpyLearner.calls.append(("fit", workdir))
        return {"mu": np.asarray(data.mean()), "var": np.asarray(data.var())}

    def evaluate(self, key, params, reference):
        return {"var": params["var"], "mu": params["mu"]}

    def sample(self, key, params, num, *, workdir=None, **kw):
        ToyNumpyLearner.calls.append(("sample", workdir))
        z = np.asarray(jax.random.normal(key, (num,)))
        return params["mu"] + np.sqrt(params["var"]) * z


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SlowToyConfig:
    """ToyNumpyLearner's model with a pause in every fit (time to race or interrupt a run) and
    an optional input file holding the real mean (an input a failed start can get wrong)."""

    kind: ClassVar[str] = "slowtoy"
    mean: float = 0.0
    std: float = 1.0
    delay: float = 0.0
    mean_file: str | None = None
    gate: str | None = None  # fits of generations >= gate_generation wait for this file
    gate_generation: int = 0


class SlowToyLearner(ToyNumpyLearner):
    def draw_real(self, key, num):
        # The input file is read when the data are first needed, inside the loop, as the
        # language model reads its tokenizer and corpus.
        mean = self.config.mean
        if self.config.mean_file is not None:
            mean = float(pathlib.Path(self.config.mean_file).read_text())
        return np.asarray(mean + self.config.std * jax.random.normal(key, (num,)))

    def fit(self, key, data, params, *, workdir=None, **kw):
        time.sleep(self.config.delay)
        generation = int(pathlib.Path(workdir).parent.name.split("_")[1])
        if self.config.gate is not None and generation >= self.config.gate_generation:
            while not pathlib.Path(self.config.gate).exists():
                time.sleep(0.02)
        return super().fit(key, data, params, workdir=workdir)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepToyConfig:
    """ToyNumpyLearner's model fitted by `steps` pretend optimizer steps (2 per epoch), with a
    checkpoint in the workdir after every epoch: a trainer by steps, without JAX, for the tests
    of metrics.jsonl (`rundir.events`)."""

    kind: ClassVar[str] = "steptoy"
    mean: float = 0.0
    std: float = 1.0
    steps: int = 6


class StepToyLearner(ToyNumpyLearner):
    def fit(self, key, data, params, *, workdir=None, log=None, **kw):
        total, start = self.config.steps, 0
        ckpt = None if workdir is None else pathlib.Path(workdir) / "step.json"
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():
                start = fileio.load_json(ckpt)["step"]
        log.begin(start, total)
        for s in range(start, total):
            log.advance(1)
            if log.due(s + 1):
                loss = float(np.mean(data)) + 1.0 / (s + 1)  # a function of the data and step
                log.step(
                    epoch=s // 2,
                    step=s + 1,
                    loss=loss,
                    learning_rate=0.5 / (s + 1),
                    grad_norm=float(np.std(data)) * (s + 1),
                    units=("images", len(data)),
                )
            if ckpt is not None and (s + 1) % 2 == 0:
                log.eval(epoch=s // 2, step=s + 1, val_loss=float(np.var(data)) + s)
                fileio.atomic_write_json(ckpt, {"step": s + 1})
        log.end()
        return super().fit(key, data, params, workdir=workdir)


# The toy model kinds the run-directory tests register ("kind": ("config", "learner")).
TOY_KINDS = {
    "toy": ("tests.helpers:ToyConfig", "tests.helpers:ToyGaussianLearner"),
    "slowtoy": ("tests.helpers:SlowToyConfig", "tests.helpers:SlowToyLearner"),
    "steptoy": ("tests.helpers:StepToyConfig", "tests.helpers:StepToyLearner"),
}
