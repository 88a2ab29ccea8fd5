"""Learning-rate schedules and the AdamW optimizer of the paper's fine-tuning.

The paper's code steps torch's `CosineAnnealingLR(T_max=epochs, eta_min=1e-6)` once per epoch;
`learning_rate_at` reproduces it (and two alternatives) as a function of the optimizer step whose
settings are runtime values, so a new learning rate or data-set size never recompiles the step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from collapse_jax.lm.train_config import SCHEDULES, TrainConfig

Schedule = Callable[[jax.Array | int], jax.Array]


def learning_rate_at(
    step: jax.Array | int, hparams: dict[str, jax.Array | float], *, kind: str
) -> jax.Array:
    """The learning rate of optimizer step `step` (0-based) under schedule `kind`.

    Args:
      step: optimizer steps done before this one.
      hparams: "learning_rate" (peak lr_0), "eta_min" (final lr), "epochs", "steps_per_epoch",
        "warmup_steps": runtime values, so changing them (another lr, a data set of another
        size) does not recompile the train step.
      kind: "paper_cosine": torch `CosineAnnealingLR(T_max=epochs, eta_min)` stepped once per
        epoch, lr = eta_min + (lr_0 - eta_min) * (1 + cos(pi * epoch / epochs)) / 2 with
        epoch = step // steps_per_epoch; "warmup_cosine": lr_0 * step / warmup_steps during
        warmup, then a per-step cosine from lr_0 down to eta_min at the last step (optax's
        `warmup_cosine_decay_schedule`); "constant": lr_0.
    """
    f32 = jnp.float32
    lr0 = jnp.asarray(hparams["learning_rate"], f32)
    eta_min = jnp.asarray(hparams["eta_min"], f32)
    epochs = jnp.asarray(hparams["epochs"], f32)
    spe = jnp.asarray(hparams["steps_per_epoch"], jnp.int32)
    warmup = jnp.asarray(hparams["warmup_steps"], f32)
    step = jnp.asarray(step, jnp.int32)
    if kind == "paper_cosine":
        epoch = (step // spe).astype(f32)
        return eta_min + (lr0 - eta_min) * (1.0 + jnp.cos(jnp.pi * epoch / epochs)) / 2.0
    if kind == "warmup_cosine":
        total = jnp.maximum(epochs * spe.astype(f32), warmup + 1.0)
        t = step.astype(f32)
        warm = lr0 * t / jnp.maximum(warmup, 1.0)
        frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
        cos = eta_min + (lr0 - eta_min) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0
        return jnp.where(t < warmup, warm, cos)
    if kind == "constant":
        return lr0 + 0.0 * eta_min
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def paper_cosine_schedule(
    learning_rate: float, epochs: int, steps_per_epoch: int, eta_min: float = 1e-6
) -> Schedule:
    """torch `CosineAnnealingLR(T_max=epochs, eta_min)` stepped once per epoch, per opt. step.

    Returns:
      step -> eta_min + (lr - eta_min) * (1 + cos(pi * (step // steps_per_epoch) / epochs)) / 2.
    """
    hp = {
        "learning_rate": learning_rate,
        "eta_min": eta_min,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": 0,
    }
    return lambda step: learning_rate_at(step, hp, kind="paper_cosine")


def schedule_hparams(config: TrainConfig, steps_per_epoch: int) -> dict[str, float | int]:
    """The runtime values of `learning_rate_at` (its `hparams`) for `config`."""
    return {
        "learning_rate": config.learning_rate,
        "eta_min": config.eta_min,
        "epochs": config.epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": config.warmup_steps,
    }


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The learning-rate schedule named by `config.schedule`, as a function of the opt. step."""
    hp = schedule_hparams(config, steps_per_epoch)
    return lambda step: learning_rate_at(step, hp, kind=config.schedule)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW at unit learning rate (torch semantics: decoupled decay, scaled by the lr with the
    Adam step), optionally after gradient clipping; `train_step` multiplies its updates by the
    scheduled learning rate, which is therefore a runtime value (no recompile per lr)."""
    adamw = optax.adamw(
        1.0,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
