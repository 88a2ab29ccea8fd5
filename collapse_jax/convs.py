"""Small 2-D convolutions as matrix products on CPU (im2col), XLA's convolutions elsewhere.

XLA's CPU backend runs small convolutions (and, above all, their gradients) far below the
machine's matmul speed: the paper's VAE trained at 0.26x the same network in PyTorch (issue 12).
Written as "gather the kh x kw shifted views into one patch tensor, then one matmul", the same
convolution runs through the CPU's GEMM, and its gradient is a matmul plus kh x kw pads (the
transposes of the slices). On GPUs and TPUs `lax.conv_general_dilated` is what cuDNN/the MXU
are built for, so it is kept there.

Measured on the shared 2-core CPU (under heavy contention, one process, batch 256 of the paper's
VAE): the gradient of the loss took 4.6 s with matmuls vs 8.7 s with XLA's convolutions
(PyTorch: 3.6-4.4 s); a sum of kh x kw shifted matmuls instead of one patch matmul was no faster.

Layout: NHWC inputs, HWIO kernels (Flax's), stride 1, VALID padding (callers pad).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

_DN = ("NHWC", "HWIO", "NHWC")

# "auto" (matmul on CPU, lax elsewhere), "matmul" or "lax"; COLLAPSE_JAX_CONV overrides.
IMPL = os.environ.get("COLLAPSE_JAX_CONV", "auto")


def impl() -> str:
    """The implementation `conv2d_valid` uses now: "matmul" or "lax"."""
    if IMPL in ("matmul", "lax"):
        return IMPL
    if IMPL != "auto":
        raise ValueError(f"COLLAPSE_JAX_CONV must be auto, matmul or lax, got {IMPL!r}")
    return "matmul" if jax.default_backend() == "cpu" else "lax"


def conv2d_valid(x: jax.Array, kernel: jax.Array, method: str | None = None) -> jax.Array:
    """Stride-1 VALID convolution (cross-correlation, as `lax.conv_general_dilated`).

    Args:
      x: [B, H, W, C] inputs.
      kernel: [kh, kw, C, O].
      method: "matmul", "lax" or None (`impl()`).
    Returns:
      [B, H - kh + 1, W - kw + 1, O].
    """
    method = method or impl()
    if method == "lax":
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DN)
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    # [B, Ho, Wo, kh * kw * C], taps in (i, j, c) order = the kernel's row-major flattening.
    patches = jnp.concatenate(
        [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    y = patches.reshape(b * ho * wo, kh * kw * c) @ kernel.reshape(kh * kw * c, o)
    return y.reshape(b, ho, wo, o)
