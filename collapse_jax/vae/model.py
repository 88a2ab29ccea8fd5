"""The paper's convolutional VAE on MNIST (Shumailov et al., Nature 2024, Fig. "VAE"), in Flax NNX.

Architecture (the paper's notebook): encoder Conv(1->64, 4x4, stride 2, pad 1) - ReLU -
Conv(64->128, 4x4, stride 2, pad 1) - ReLU - flatten - two linear heads (mean, log-variance) of a
20-dimensional latent; decoder Linear(20 -> 128*7*7) - ReLU - ConvTranspose(128->64) - ReLU -
ConvTranspose(64->1) with a sigmoid output (Bernoulli means). Loss: binary cross-entropy of the
pixels (summed) plus the KL divergence to N(0, I), summed over the batch; Adam lr 1e-3 with
PyTorch-style weight decay 1e-5 (added to the gradient), batch 256, 30 epochs.

In the generational loop every generation trains a fresh VAE (`init_from: scratch`) on images
decoded from prior samples z ~ N(0, I) of the previous generation's VAE. Samples are the
decoder's Bernoulli means (`sample_mode: mean`, what the paper's figures show), stored like
MNIST itself as uint8 (p * 255 rounded); `sample_mode: bernoulli` draws binary images instead.

Shape letters: `B` batch, `Z` latent dimension; images are `[B, 28, 28]` uint8 (or float in
[0, 1]).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from collapse_jax.config import ConfigError
from collapse_jax.jaxtools import convs
from collapse_jax.rundir import events, fileio

Params = dict[str, Any]  # a pure dict of arrays (`nnx.split` state as plain dicts)


class VAE(nnx.Module):
    """The convolutional VAE; images NHWC inside, `[B, 28, 28]` outside."""

    def __init__(
        self, latent_dim: int = 20, channels: tuple[int, int] = (64, 128), *, rngs: nnx.Rngs
    ):
        c1, c2 = channels
        pad, tpad = _PAD, _TPAD
        self.channels = channels
        self.conv1 = nnx.Conv(1, c1, (4, 4), strides=(2, 2), padding=pad, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (4, 4), strides=(2, 2), padding=pad, rngs=rngs)
        self.fc_mu = nnx.Linear(c2 * 7 * 7, latent_dim, rngs=rngs)
        self.fc_logvar = nnx.Linear(c2 * 7 * 7, latent_dim, rngs=rngs)
        self.fc_dec = nnx.Linear(latent_dim, c2 * 7 * 7, rngs=rngs)
        self.deconv1 = nnx.ConvTranspose(c2, c1, (4, 4), strides=(2, 2), padding=tpad, rngs=rngs)
        self.deconv2 = nnx.ConvTranspose(c1, 1, (4, 4), strides=(2, 2), padding=tpad, rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, 28, 28] in [0, 1] -> (mean [B, Z], log-variance [B, Z])."""
        h = nnx.relu(conv_down(self.conv1, x[..., None]))  # [B, 14, 14, c1]
        h = nnx.relu(conv_down(self.conv2, h))  # [B, 7, 7, c2]
        h = h.reshape(h.shape[0], -1)  # [B, 7 * 7 * c2]
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, Z] -> pixel logits [B, 28, 28] (sigmoid of them: the Bernoulli means)."""
        h = nnx.relu(self.fc_dec(z)).reshape(z.shape[0], 7, 7, self.channels[1])
        h = nnx.relu(conv_up(self.deconv1, h))  # [B, 14, 14, c1]
        return conv_up(self.deconv2, h)[..., 0]  # [B, 28, 28]


# The layers' parameters are those of nnx.Conv / nnx.ConvTranspose (kernel [4, 4, in, out]), applied
# through jaxtools/convs.py: the same convolutions, with gradients that stay on XLA:CPU's fast
# paths (JAX's own gradient of the transposed convolution's kernel ran on a slow generic path and
# took most of the training step). tests/unit/test_vae.py compares them with the Flax layers.
_PAD = ((1, 1), (1, 1))  # PyTorch Conv2d(padding=1)
_TPAD = ((2, 2), (2, 2))  # PyTorch ConvTranspose2d(k=4, s=2, padding=1) == padding k - 1 - 1


def conv_down(layer: nnx.Conv, x: jax.Array) -> jax.Array:
    """Conv(k=4, stride 2, pad 1): [B, H, W, C] -> [B, H/2, W/2, O]."""
    return convs.conv(x, layer.kernel[...], (2, 2), _PAD) + layer.bias[...][None, None, None, :]


def conv_up(layer: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
    """ConvTranspose(k=4, stride 2, PyTorch padding 1): [B, H, W, C] -> [B, 2H, 2W, O]."""
    return (
        convs.conv_transpose(x, layer.kernel[...], (2, 2), _TPAD)
        + layer.bias[...][None, None, None, :]
    )


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images are passed through."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def loss_terms(model: VAE, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image BCE (summed over pixels) and KL of one reparameterised draw.

    Args:
      model: the VAE.
      x: [B, 28, 28] images in [0, 1].
      key: PRNG key of the reparameterisation noise.
    Returns:
      (bce [B], kl [B]); bce + kl is the negative ELBO estimate.
    """
    mu, logvar = model.encode(x)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
    logits = model.decode(z)
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=(1, 2))
    kl = -0.5 * jnp.sum(1.0 + logvar - mu * mu - jnp.exp(logvar), axis=1)
    return bce, kl


# ----------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VAEConfig:
    """The VAE learner (`model: {kind: vae, ...}`); defaults follow the paper's notebook.

    Attributes:
      data_dir: MNIST source for `vae.mnist.load_mnist` (idx folder, mnist.npz, "tfds").
      train_size: real training images of generation 0 (a fixed random subset; None: all 60000).
      test_size: test images the ELBO is measured on (None: all 10000).
      latent_dim: Z, the latent dimension (paper: 20).
      channels: encoder convolution channels (paper: 64, 128); the decoder mirrors them.
      epochs: training epochs per generation (paper: 30).
      batch_size: images per optimizer step (paper: 256).
      learning_rate: Adam learning rate (paper: 1e-3).
      weight_decay: L2 penalty added to the gradient, as PyTorch's Adam (paper: 1e-5).
      sample_mode: "mean" (decoder's Bernoulli means, the paper's figures) or "bernoulli"
        (binary images drawn from them).
      sampling_bias: lambda > 0: synthetic images are decoded from latents z ~ N(0, lambda I)
        (lambda < 1 concentrates them on the typical images; 1: the paper).
      eval_batch_size: images per batch when evaluating, sampling and encoding.
      probe_size: images of every generation encoded by generation 0's encoder (figures).
      grid_size: the sample grid of each generation is grid_size x grid_size images.
    """

    kind: ClassVar[str] = "vae"
    data_dir: str = "${COLLAPSE_JAX_DATA:-data}/mnist"
    train_size: int | None = None
    test_size: int | None = None
    latent_dim: int = 20
    channels: tuple[int, int] = (64, 128)
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    sample_mode: Literal["mean", "bernoulli"] = "mean"
    sampling_bias: float = 1.0
    eval_batch_size: int = 1000
    probe_size: int = 2000
    grid_size: int = 8

    def __post_init__(self):
        def check(ok: bool, field: str, problem: str) -> None:
            if not ok:
                raise ConfigError(f"model.{field}: {problem}")

        check(bool(self.data_dir), "data_dir", "must name an MNIST source")
        check(
            self.train_size is None or 2 <= self.train_size <= 60000,
            "train_size",
            f"must lie in [2, 60000] (got {self.train_size})",
        )
        check(
            self.test_size is None or 1 <= self.test_size <= 10000,
            "test_size",
            f"must lie in [1, 10000] (got {self.test_size})",
        )
        check(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        check(
            math.isfinite(self.sampling_bias) and self.sampling_bias > 0,
            "sampling_bias",
            f"must be > 0 (got {self.sampling_bias})",
        )
        check(all(c >= 1 for c in self.channels), "channels", "must be >= 1")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "learning_rate",
            "must be a finite number > 0",
        )
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.probe_size >= 1, "probe_size", "must be >= 1")
        check(self.grid_size >= 1, "grid_size", "must be >= 1")


# ----------------------------------------------------------------------------------------------
# Functional training (nnx.split once, plain jax.jit over nnx.merge).


@functools.cache
def _graphdef(latent_dim: int, channels: tuple[int, int]):
    model = nnx.eval_shape(lambda: VAE(latent_dim, channels, rngs=nnx.Rngs(0)))
    return nnx.split(model)[0]


def init_params(
    key: jax.Array, latent_dim: int = 20, channels: tuple[int, int] = (64, 128)
) -> Params:
    """Fresh VAE parameters (Flax's default initialisers) as a pure dict."""
    model = VAE(latent_dim, tuple(channels), rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.split(model)[1])


def merge(cfg: VAEConfig | tuple, params: Params) -> VAE:
    """The VAE module of `params` (`cfg` may be a config or its `_arch` tuple)."""
    latent_dim, channels = _arch(cfg) if isinstance(cfg, VAEConfig) else cfg
    return nnx.merge(_graphdef(latent_dim, channels), params)


def _arch(cfg: VAEConfig) -> tuple[int, tuple[int, ...]]:
    """What the jitted functions depend on: compiles are shared by configs that agree on it."""
    return cfg.latent_dim, tuple(cfg.channels)


def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    # PyTorch Adam(weight_decay=wd) adds wd * param to the gradient before the moments.
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


@functools.partial(jax.jit, static_argnames=("arch", "lr", "wd"), donate_argnums=(0, 1))
def _train_step(params, opt_state, x, mask, key, *, arch, lr, wd):
    """One optimizer step on a batch x [B, 28, 28] (mask [B] drops padding); returns
    (params, opt_state, summed loss, gradient norm)."""

    def loss_fn(p):
        bce, kl = loss_terms(merge(arch, p), to_unit(x), key)
        return jnp.sum((bce + kl) * mask)  # summed over the batch, as the paper's code

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(lr, wd).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)


def _train_epoch(params, opt_state, images, key, *, arch, batch_size, lr, wd, log=None, first=0):
    """One epoch: shuffle, then one jitted step per batch; the last batch is padded and masked,
    so every image counts once and the step compiles once. (A `lax.scan` over the batches was
    much slower on XLA's CPU backend: convolutions inside a loop body miss the fast path.)
    Steps `log.due` names are reported one step late (`events.StepLog`; `first`: the optimizer
    steps before this epoch), so the loop never waits for a step it just dispatched.
    Returns (params, opt_state, loss summed over the epoch)."""
    n, b = images.shape[0], batch_size
    k_perm, k_steps = jax.random.split(key)
    perm = np.asarray(jax.random.permutation(k_perm, n))
    total = 0.0
    steps = -(-n // b)
    pending = None

    def report(i, loss, gnorm, count):
        log.step(
            epoch=first // steps,
            step=first + i + 1,
            loss=float(loss) / count,
            learning_rate=lr,
            grad_norm=float(gnorm),
            units=("images", b),
        )

    for i, lo in enumerate(range(0, n, b)):
        idx = perm[lo : lo + b]
        mask = np.ones(b, np.float32)
        count = idx.size
        if idx.size < b:
            mask[idx.size :] = 0
            idx = np.concatenate([idx, np.zeros(b - idx.size, idx.dtype)])
        params, opt_state, loss, gnorm = _train_step(
            params,
            opt_state,
            images[idx],
            jnp.asarray(mask),
            jax.random.fold_in(k_steps, i),
            arch=arch,
            lr=lr,
            wd=wd,
        )
        total = total + loss
        if pending is not None:
            report(*pending)
            pending = None
        if log is not None:
            if log.due(first + i + 1):
                pending = (i, loss, gnorm, count)
            log.advance(1)
    if pending is not None:
        report(*pending)
    return params, opt_state, total


def make_train_step(cfg: VAEConfig) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """A newly jitted training step of `cfg`, `step(params, opt_state, x [B, 28, 28], mask [B],
    key) -> (params, opt_state, summed loss)` (params and opt_state donated), the step `train`
    takes. Each call builds its own program, traced at its first call: the convolutions chosen
    then (`jaxtools.convs.IMPL`) stay in it, so two steps can be timed side by side."""
    kw = dict(arch=_arch(cfg), lr=cfg.learning_rate, wd=cfg.weight_decay)
    step = jax.jit(functools.partial(_train_step.__wrapped__, **kw), donate_argnums=(0, 1))
    return lambda *args: step(*args)[:3]


def init_optimizer(params: Params, cfg: VAEConfig) -> Any:
    """The optimizer state of `cfg`'s Adam (with PyTorch-style weight decay) for `params`."""
    return _optimizer(cfg.learning_rate, cfg.weight_decay).init(params)


def train_step(
    params: Params, opt_state: Any, x: jax.Array, mask: jax.Array, key: jax.Array, cfg: VAEConfig
) -> tuple[Params, Any, jax.Array]:
    """One optimizer step of `train` on a batch x [B, 28, 28] (mask [B]: 0 drops a padding
    row); `params` and `opt_state` are donated. Returns (params, opt_state, summed loss)."""
    return _train_step(
        params,
        opt_state,
        x,
        mask,
        key,
        arch=_arch(cfg),
        lr=cfg.learning_rate,
        wd=cfg.weight_decay,
    )[:3]


def train_epoch(
    params: Params, opt_state: Any, images: jax.Array, key: jax.Array, cfg: VAEConfig
) -> tuple[Params, Any, jax.Array]:
    """One epoch of `train` (shuffled with `key`) on images [N, 28, 28]; `params` and
    `opt_state` are donated. Returns (params, opt_state, loss summed over the epoch)."""
    return _train_epoch(
        params,
        opt_state,
        images,
        key,
        arch=_arch(cfg),
        batch_size=cfg.batch_size,
        lr=cfg.learning_rate,
        wd=cfg.weight_decay,
    )


def train(
    key: jax.Array,
    images: jax.Array | np.ndarray,
    params: Params,
    cfg: VAEConfig,
    *,
    workdir: pathlib.Path | None = None,
    log: events.StepLog | None = None,
) -> tuple[Params, list[float]]:
    """Trains the VAE for `cfg.epochs` epochs.

    Args:
      key: PRNG key (epoch e uses fold_in(key, e): a resumed run gives the same result).
      images: [N, 28, 28] uint8 or float in [0, 1].
      params: starting parameters.
      cfg: the VAE config (epochs, batch size, optimizer).
      workdir: if given, the state is saved there after every epoch and training resumes
        from the last saved epoch.
      log: where the optimizer steps are reported (`rundir.events.StepLog`: metrics.jsonl
        records every `every_steps` steps, with the batch's mean per-image loss, and a progress
        bar); None reports nothing.
    Returns:
      (params, history): history[e] is epoch e's mean per-image loss (negative ELBO estimate).
    """
    images = jnp.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"VAE images must have shape [N, 28, 28], got {images.shape}")
    n = images.shape[0]
    opt_state = init_optimizer(params, cfg)
    history: list[float] = []
    start = 0
    ckpt = None if workdir is None else pathlib.Path(workdir) / "train_state.npz"
    if ckpt is not None and ckpt.is_file():
        meta = fileio.load_json(ckpt.parent / "train_state.json")
        params, opt_state = fileio.load_tree(ckpt, (params, opt_state))
        params, opt_state = jax.tree.map(jnp.asarray, (params, opt_state))
        start, history = meta["epoch"] + 1, meta["history"]
    spe = -(-n // cfg.batch_size)
    if log is not None:
        log.begin(start * spe, cfg.epochs * spe, desc="train")
    try:
        for epoch in range(start, cfg.epochs):
            params, opt_state, total = _train_epoch(
                params,
                opt_state,
                images,
                jax.random.fold_in(key, epoch),
                arch=_arch(cfg),
                batch_size=cfg.batch_size,
                lr=cfg.learning_rate,
                wd=cfg.weight_decay,
                log=log,
                first=epoch * spe,
            )
            history.append(float(total) / n)
            if ckpt is not None:
                fileio.save_tree(ckpt, (params, opt_state))
                fileio.atomic_write_json(
                    ckpt.parent / "train_state.json", {"epoch": epoch, "history": history}
                )
    finally:
        if log is not None:
            log.end()
    return params, history


@functools.partial(jax.jit, static_argnames=("arch", "mode"))
def _decode_batch(params, z, key, *, arch, mode: str):
    p = jax.nn.sigmoid(merge(arch, params).decode(z))  # [B, 28, 28] Bernoulli means
    if mode == "bernoulli":
        return jnp.where(jax.random.uniform(key, p.shape) < p, 255, 0).astype(jnp.uint8)
    return jnp.round(p * 255.0).astype(jnp.uint8)


def generate(key: jax.Array, params: Params, num: int, cfg: VAEConfig) -> np.ndarray:
    """`num` images decoded from prior samples z ~ N(0, lambda I) (lambda = cfg.sampling_bias).

    Returns:
      [num, 28, 28] uint8 (Bernoulli means * 255, or binary draws for sample_mode bernoulli).
    """
    b = cfg.eval_batch_size
    out = []
    for i, lo in enumerate(range(0, num, b)):
        k_z, k_pix = jax.random.split(jax.random.fold_in(key, i))
        z = jax.random.normal(k_z, (b, cfg.latent_dim))
        if cfg.sampling_bias != 1.0:
            z = z * math.sqrt(cfg.sampling_bias)
        imgs = _decode_batch(params, z, k_pix, arch=_arch(cfg), mode=cfg.sample_mode)
        out.append(np.asarray(imgs)[: num - lo])
    return np.concatenate(out) if out else np.zeros((0, 28, 28), np.uint8)


@functools.partial(jax.jit, static_argnames=("arch",))
def _eval_batch(params, x, mask, key, *, arch):
    model = merge(arch, params)
    x = to_unit(x)
    bce, kl = loss_terms(model, x, key)
    mu, _ = model.encode(x)
    logits = model.decode(mu)
    recon = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=(1, 2))
    return jnp.sum(bce * mask), jnp.sum(kl * mask), jnp.sum(recon * mask)


def _batches(images: np.ndarray, b: int):
    """Fixed-size batches (the last one padded) with their masks."""
    n = images.shape[0]
    for lo in range(0, n, b):
        x = images[lo : lo + b]
        m = np.ones(b, np.float32)
        if x.shape[0] < b:
            m[x.shape[0] :] = 0
            x = np.concatenate([x, np.zeros((b - x.shape[0],) + x.shape[1:], x.dtype)])
        yield x, m


def evaluate_elbo(
    key: jax.Array, params: Params, images: np.ndarray, cfg: VAEConfig
) -> dict[str, float]:
    """Mean per-image test metrics: BCE and KL of one reparameterised draw, their sum (the
    negative ELBO) and the reconstruction BCE at the posterior mean."""
    sums = np.zeros(3)
    for i, (x, m) in enumerate(_batches(np.asarray(images), cfg.eval_batch_size)):
        out = _eval_batch(
            params, jnp.asarray(x), jnp.asarray(m), jax.random.fold_in(key, i), arch=_arch(cfg)
        )
        sums += np.asarray(jax.device_get(out), np.float64)
    bce, kl, recon = sums / len(images)
    return {"test_bce": bce, "test_kl": kl, "test_loss": bce + kl, "test_recon_bce": recon}


@functools.partial(jax.jit, static_argnames=("arch",))
def _encode_batch(params, x, *, arch):
    return merge(arch, params).encode(to_unit(x))[0]


def encode_means(params: Params, images: np.ndarray, cfg: VAEConfig) -> np.ndarray:
    """[N, Z] posterior means of `images` under the encoder of `params`."""
    n = len(images)
    out = [
        np.asarray(_encode_batch(params, jnp.asarray(x), arch=_arch(cfg)))
        for x, _ in _batches(np.asarray(images), cfg.eval_batch_size)
    ]
    return np.concatenate(out)[:n]


def latent_spread(z: np.ndarray) -> float:
    """Spread of latent codes [N, Z]: the root mean over dimensions of their variance."""
    return float(np.sqrt(np.mean(np.var(np.asarray(z, np.float64), axis=0))))
