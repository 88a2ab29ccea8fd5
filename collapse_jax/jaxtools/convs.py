"""2-D convolutions and transposed convolutions whose gradients stay on XLA:CPU's fast paths.

XLA's CPU backend runs the paper's VAE's stride-2 convolution, its input gradient and its kernel
gradient near matmul speed. But JAX's automatic gradient of a *transposed* convolution (the
decoder) asks for a kernel gradient in a form that XLA:CPU runs on a slow generic path, an order
of magnitude slower than the same-sized strided convolution's kernel gradient (issue 12; it took
most of the VAE's training step). A transposed convolution is the input gradient of a strided
convolution, so on CPU `conv_transpose` carries its own gradient: that strided convolution (for
the input) and its kernel gradient (for the kernel), both fast. Thin layers (one channel, as the
VAE's first and last layers) get their kernel gradient and transposed convolution as a matrix
product over patches, which XLA:CPU's convolutions run slower: that is decided per layer by the
size of the patch tensor. On GPUs and TPUs `lax` convolutions and JAX's own gradients are what
cuDNN / the MXU are built for, so they are used there unchanged.

Which platform takes which path is decided inside the traced program
(`jax.lax.platform_dependent`), not from the Python process's default backend: a program
lowered for CPU carries the custom gradients, one lowered (or exported, `jax.export`) for CUDA or
TPU the plain `lax` convolutions, whatever machine traced it. tests/unit/test_xla_tricks.py
checks both on exported programs. `COLLAPSE_JAX_CONV=cpu|lax` (or `method=`) forces one path on
every platform (for A/B measurements).

benchmarks/bench_vae.py measures the training step with these convolutions, with JAX's own
gradients of XLA's convolutions, with the previous patch-matmul convolutions and in PyTorch,
interleaved in one process: benchmarks/results/vae_conv_ab-cpu.json (`images_per_s`,
`ratio_vs_torch_median`).

Layout: NHWC inputs, HWIO kernels (Flax's); padding as explicit (low, high) pairs per spatial
dimension.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
Pairs = tuple[tuple[int, int], tuple[int, int]]

# "auto" (custom gradients on CPU, lax elsewhere), "cpu" or "lax"; COLLAPSE_JAX_CONV overrides.
IMPL = os.environ.get("COLLAPSE_JAX_CONV", "auto")


def _setting(method: str | None = None) -> str:
    """`method`, else COLLAPSE_JAX_CONV: "auto", "cpu" or "lax"."""
    m = method or IMPL
    if m not in ("auto", "cpu", "lax"):
        raise ValueError(f"COLLAPSE_JAX_CONV must be auto, cpu or lax, got {m!r}")
    return m


def impl(platform: str | None = None) -> str:
    """The implementation a program for `platform` (default: JAX's default backend) runs: "cpu"
    (custom gradients) or "lax" (JAX's own)."""
    m = _setting()
    if m != "auto":
        return m
    return "cpu" if (platform or jax.default_backend()) == "cpu" else "lax"


def _per_platform(cpu_fn, lax_fn, method, *args):
    """`cpu_fn(*args)` in programs for CPU and `lax_fn(*args)` elsewhere ("auto"; chosen when
    the program is lowered, so an exported CUDA/TPU program holds only `lax_fn`), or the one
    `method` / COLLAPSE_JAX_CONV forces."""
    m = _setting(method)
    if m == "auto":
        return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=lax_fn)
    return (cpu_fn if m == "cpu" else lax_fn)(*args)


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Pairs = ((0, 0), (0, 0)),
    method: str | None = None,
) -> jax.Array:
    """A convolution (cross-correlation, as `lax.conv_general_dilated` and `nnx.Conv`).

    Args:
      x: [B, H, W, C] inputs.
      kernel: [kh, kw, C, O].
      strides: (sh, sw).
      padding: ((low, high), (low, high)) zero padding of H and W.
      method: "cpu", "lax", "auto" (per platform) or None (COLLAPSE_JAX_CONV, default auto).
    Returns:
      [B, Ho, Wo, O], Ho = (H + low + high - kh) // sh + 1 (and Wo alike).
    """
    strides, padding = _norm(strides, padding)
    return _per_platform(
        lambda a, k: _conv_cpu(a, k, strides, padding),
        lambda a, k: _lax_conv(a, k, strides, padding),
        method,
        x,
        kernel,
    )


def conv_transpose(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Pairs,
    method: str | None = None,
) -> jax.Array:
    """`lax.conv_transpose(x, kernel, strides, padding)` (kernel not flipped, as
    `nnx.ConvTranspose`): the input dilated by the strides, padded, then convolved.

    Args:
      x: [B, H, W, C] inputs.
      kernel: [kh, kw, C, O].
      strides: (sh, sw).
      padding: ((low, high), (low, high)) padding of the dilated input (PyTorch's
        ConvTranspose2d(k, s, p) is padding k - 1 - p on both sides).
      method: "cpu", "lax", "auto" (per platform) or None (COLLAPSE_JAX_CONV, default auto).
    Returns:
      [B, L, M, O] with L = sh * (H - 1) + 1 + low + high - kh + 1 (and M alike).
    """
    strides, padding = _norm(strides, padding)
    return _per_platform(
        lambda a, k: _conv_transpose_cpu(a, k, strides, padding),
        lambda a, k: lax.conv_transpose(a, k, strides, padding, dimension_numbers=_DN),
        method,
        x,
        kernel,
    )


def _norm(strides, padding) -> tuple[tuple[int, int], Pairs]:
    """Hashable (strides, padding): they are static arguments of the custom gradients."""
    return tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding)


def _lax_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _thin(patch_elems: int, *activation_elems: int) -> bool:
    """Whether a patch (im2col) or overlap-add (col2im) tensor of `patch_elems` elements is
    no larger than the layer's largest activation: then a matmul over it is cheap, and beats
    XLA:CPU's convolution for one-channel layers (it loses on wide ones)."""
    return patch_elems <= max(activation_elems)


def _patches(x, kshape, strides, padding, out_hw):
    """im2col: [B, Ho, Wo, kh * kw * C], taps in (i, j, c) order (the kernel's flattening)."""
    kh, kw = kshape[:2]
    (sh, sw), (ho, wo) = strides, out_hw
    x = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in padding) + ((0, 0, 0),),
    )  # may be negative
    views = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(views, axis=-1)


def _kernel_grad(x, dy, kshape, strides, padding):
    """d(sum(dy * conv(x, K))) / dK, [kh, kw, C, O]."""
    b, ho, wo, o = dy.shape
    size = b * ho * wo * kshape[0] * kshape[1] * kshape[2]
    if _thin(size, x.size, dy.size):
        p = _patches(x, kshape, strides, padding, (ho, wo)).reshape(-1, size // (b * ho * wo))
        return (p.T @ dy.reshape(-1, o)).reshape(kshape)
    zeros = jnp.zeros(kshape, x.dtype)
    return jax.vjp(lambda k: _lax_conv(x, k, strides, padding), zeros)[1](dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cpu(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding)


def _conv_cpu_fwd(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding), (x, kernel)


def _conv_cpu_bwd(strides, padding, res, dy):
    x, kernel = res
    dx = jax.vjp(lambda z: _lax_conv(z, kernel, strides, padding), x)[1](dy)[0]
    return dx, _kernel_grad(x, dy, kernel.shape, strides, padding)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def _as_conv(kernel, padding):
    """(W, padding) of the convolution whose input gradient is conv_transpose(., kernel):
    W = the kernel flipped in space with its channel axes swapped, [kh, kw, O, C]; padding
    k - 1 - p. (Its output always has the transposed convolution's input size.)"""
    w = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    pad = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:2], padding))
    return w, pad


def _transposed_size(x, kernel, strides, padding) -> int:
    """Elements of conv_transpose's output."""
    dims = [
        s * (n - 1) + 1 + lo + hi - k + 1
        for n, k, s, (lo, hi) in zip(x.shape[1:3], kernel.shape[:2], strides, padding)
    ]
    return x.shape[0] * math.prod(dims) * kernel.shape[-1]


def _col2im_transpose(x, kernel, strides, padding):
    """conv_transpose as one matmul then overlap-add: P[i, u] = x[i] @ K[u] lands on output
    o = s * i + low - u. Output phase a (o = s * m + a) sums the taps u = low - a (mod s),
    each a shifted slice P[m + (u + a - low) / s, u]; the phases are interleaved at the end."""
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    p = x.reshape(-1, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * o)
    p = p.reshape(b, h, w, kh, kw, o)

    def taps(k, s, n, lo, hi):  # per phase: [(u, d)], phase length, padding of P
        length = s * (n - 1) + 1 + lo + hi - k + 1
        m = -(-length // s)
        ph = [[(u, (u + a - lo) // s) for u in range(k) if (u + a - lo) % s == 0] for a in range(s)]
        ds = [d for t in ph for _, d in t] or [0]
        return ph, m, length, (max(0, -min(ds)), max(0, m - 1 + max(ds) - (n - 1)))

    (sh, sw), ((lh, hh), (lw, hw)) = strides, padding
    ph_h, mh, len_h, pad_h = taps(kh, sh, h, lh, hh)
    ph_w, mw, len_w, pad_w = taps(kw, sw, w, lw, hw)
    p = jnp.pad(p, ((0, 0), pad_h, pad_w, (0, 0), (0, 0), (0, 0)))
    rows = []
    for a in range(sh):
        cols = []
        for a2 in range(sw):
            acc = jnp.zeros((b, mh, mw, o), p.dtype)
            for u, du in ph_h[a]:
                for v, dv in ph_w[a2]:
                    i0, j0 = pad_h[0] + du, pad_w[0] + dv
                    acc = acc + p[:, i0 : i0 + mh, j0 : j0 + mw, u, v, :]
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))  # [B, mh, mw, sw, O]
    y = jnp.stack(rows, axis=2)  # [B, mh, sh, mw, sw, O]
    return y.reshape(b, mh * sh, mw * sw, o)[:, :len_h, :len_w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose_cpu(x, kernel, strides, padding):
    kh, kw, _, o = kernel.shape
    if _thin(
        x.size // x.shape[-1] * kh * kw * o, x.size, _transposed_size(x, kernel, strides, padding)
    ):
        return _col2im_transpose(x, kernel, strides, padding)
    return lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)


def _conv_transpose_cpu_fwd(x, kernel, strides, padding):
    return _conv_transpose_cpu(x, kernel, strides, padding), (x, kernel)


def _conv_transpose_cpu_bwd(strides, padding, res, dy):
    x, kernel = res
    w, pad = _as_conv(kernel, padding)
    # y = A^T x with A = conv(., W): dx = A dy, and dW is the kernel gradient of conv(dy, W)
    # against the cotangent x.
    dx = _lax_conv(dy, w, strides, pad)
    dw = _kernel_grad(dy, x, w.shape, strides, pad)
    return dx, jnp.flip(dw.swapaxes(2, 3), (0, 1))


_conv_transpose_cpu.defvjp(_conv_transpose_cpu_fwd, _conv_transpose_cpu_bwd)
