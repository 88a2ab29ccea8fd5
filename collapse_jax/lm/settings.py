"""`DecodeSettings`: the static settings of one decoding program, the experiment's `decode:` block.

Its own module so that the logits processors (`lm.processors`), the search loops (`lm.search`),
the `generate` entry point (`lm.decode`) and the experiment config all import it without
importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

# transformers' global default for `top_k` when sampling (GenerationConfig defaults).
HF_DEFAULT_TOP_K = 50

DECODE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_decode_dtype(dtype: str | None) -> str | None:
    """The compute dtype a decode `dtype` setting stands for on the backend JAX runs on now.

    "auto" is bfloat16 on an accelerator (GPU, TPU: the KV cache and the weights are read every
    step, so halving them nearly halves a memory-bound step) and float32 on CPU (no bf16 matmul
    units; float32 also keeps the token-exact parity with transformers). None stays None (the
    model's own dtype); "float32" and "bfloat16" are taken as given.
    """
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DecodeSettings:
    """Static settings of one decoding program (hashable: one compiled program per value).

    Fields follow transformers' `GenerationConfig` after its defaults are resolved: `top_k=0`
    disables top-k, `top_p=1.0` disables top-p, `eos_token_ids=()` means no EOS. `dtype` is the
    compute dtype of the model while decoding, and of its KV cache: "float32", "bfloat16",
    "auto" (`resolve_decode_dtype`: bfloat16 on accelerators, float32 on CPU), or None (the
    model's own dtype). Logits, softmax and beam scores stay float32 in every case.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_return_sequences: int = 1
    dtype: Literal["auto", "float32", "bfloat16"] | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DECODE_DTYPES:
            raise ValueError(f"dtype must be one of {DECODE_DTYPES} or None, got {self.dtype!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if any(e < 0 for e in self.eos_token_ids):
            raise ValueError(f"eos_token_id must be non-negative, got {self.eos_token_ids}")
        n = self.num_return_sequences
        if n < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {n}")
        if self.num_beams > 1 and n > self.num_beams:
            raise ValueError(f"num_return_sequences ({n}) must be <= num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and n > 1:
            raise ValueError(
                "greedy decoding returns one sequence per prompt: num_return_sequences "
                f"must be 1 (got {n}); use do_sample=True or num_beams > 1"
            )

    @property
    def rows_per_prompt(self) -> int:
        """Rows fed to the model per prompt (transformers' `expand_size`)."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @property
    def min_tokens_to_keep(self) -> int:
        """Tokens the top-k / top-p warpers always keep (more for beam sampling, as in HF)."""
        if self.num_beams > 1:
            return len(self.eos_token_ids) + 1 if self.eos_token_ids else 2
        return 1

    @property
    def fill_token_id(self) -> int:
        """Token after the end of a finished sequence.

        Greedy/sampling pads with `pad_token_id` (HF falls back to the first EOS id). Beam search
        fills with HF's `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`,
        which takes the EOS id when the pad id is 0.
        """
        eos = self.eos_token_ids
        if self.num_beams > 1:
            if not eos:
                return -1
            return self.pad_token_id if self.pad_token_id else eos[0]
        if self.pad_token_id is not None:
            return self.pad_token_id
        return eos[0] if eos else 0
