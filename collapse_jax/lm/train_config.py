"""`TrainConfig`: the settings of OPT fine-tuning (`lm.train.fit`), the experiment's `train:` block.

Its own module so that the schedule (`lm.schedule`), the trainer (`lm.train`) and the experiment
config (`lm.experiment`) all import it without importing each other.
"""

from __future__ import annotations

import dataclasses

# The learning-rate schedules `lm.schedule.learning_rate_at` implements.
SCHEDULES = ("paper_cosine", "warmup_cosine", "constant")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Hyper-parameters of `fit` / `finetune` (defaults: the paper's code where it sets them).

    This is also the `train:` block of the language-model experiment config, handed down whole.

    Attributes:
      epochs: passes over the training blocks (the paper: 5).
      batch_size: blocks per optimizer step (global, over all devices and processes; paper 128).
      learning_rate: peak learning rate (the paper: 2e-5).
      schedule: "paper_cosine" (cosine annealing per epoch, T_max = epochs), "warmup_cosine"
        (linear warmup over `warmup_steps`, then cosine per step down to `eta_min`) or "constant".
      eta_min: final learning rate of the cosine schedules (the paper: 1e-6).
      warmup_steps: warmup length of "warmup_cosine".
      weight_decay, b1, b2, eps: AdamW (torch's defaults).
      max_grad_norm: clip the global gradient norm to this (None = no clipping, as the paper).
      grad_accum_steps: split each batch into this many micro-batches (same result, less memory).
      compute_dtype: dtype of the forward/backward pass ("bfloat16"); parameters and optimizer
        state stay in their own dtype (fp32 master weights). None = the parameters' dtype.
      dropout: apply the model's dropout during training (the model's own rates).
      shuffle: reshuffle the blocks every epoch (as the paper's DataLoader).
      drop_last: drop a last partial batch (the paper keeps it).
      pad_token_id: token id treated as padding (masked from attention and loss); None = every
        token is real (the paper's blocks have no padding).
      eval_batch_size: batch size of the per-epoch validation (default `batch_size`).
      save_every_steps: save a checkpoint every this many optimizer steps (and at every epoch
        end); None = only at epoch ends.
      keep_checkpoints: how many recent step checkpoints to keep.
      prefetch: batches prepared ahead of the running step.
      keep_best: return the parameters of the epoch with the lowest validation loss instead of
        the last epoch's (the paper's `ModelCheckpoint(monitor="val_loss")`); needs validation
        blocks (without them the last epoch is returned).
    """

    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 2e-5
    schedule: str = "paper_cosine"
    eta_min: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = None
    grad_accum_steps: int = 1
    compute_dtype: str | None = None
    dropout: bool = True
    shuffle: bool = True
    drop_last: bool = False
    pad_token_id: int | None = None
    eval_batch_size: int | None = None
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    prefetch: int = 2
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide "
                f"batch_size={self.batch_size}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {self.save_every_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
