"""The convolutional VAE: architecture, training on real MNIST, resumption, generations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collapse_jax import loop
from collapse_jax.config import ConfigError, ExperimentConfig, GenerationConfig
from collapse_jax.rundir import fileio, reader
from collapse_jax.vae import figures as vae_figures
from collapse_jax.vae import mnist
from collapse_jax.vae import model as vae

# Tests train a narrow version of the paper's network (same layers, fewer channels) on CPU.
SMALL = dict(channels=(8, 16), batch_size=32, eval_batch_size=64, probe_size=64, grid_size=2)


@pytest.fixture(scope="module")
def images(data_dir):
    return mnist.load_mnist(data_dir / "mnist", "train")[0][:256]


def test_paper_architecture_shapes():
    def forward():
        model = vae.VAE(20, (64, 128), rngs=nnx.Rngs(0))
        mu, logvar = model.encode(jnp.zeros((3, 28, 28)))
        return mu, logvar, model.decode(mu)

    mu, logvar, logits = jax.eval_shape(forward)
    assert mu.shape == logvar.shape == (3, 20) and logits.shape == (3, 28, 28)
    model = nnx.eval_shape(lambda: vae.VAE(20, (64, 128), rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(params)}
    assert shapes["conv1/kernel"] == (4, 4, 1, 64) and shapes["conv2/kernel"] == (4, 4, 64, 128)
    assert shapes["fc_mu/kernel"] == (128 * 7 * 7, 20)
    assert shapes["deconv1/kernel"] == (4, 4, 128, 64) and shapes["deconv2/kernel"] == (4, 4, 64, 1)


def test_strided_conv_rewrites_equal_flax_layers():
    """The VAE's 4x4 stride-2 (transposed) convolutions, applied through jaxtools/convs.py,
    equal the Flax layers whose parameters they use (gradients: tests/unit/test_convs.py)."""
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (2, 10, 6, 3))
    down = nnx.Conv(3, 5, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
    np.testing.assert_allclose(vae.conv_down(down, x), down(x), atol=1e-5)
    up = nnx.ConvTranspose(3, 5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), rngs=rngs)
    assert up(x).shape == (2, 20, 12, 5)
    np.testing.assert_allclose(vae.conv_up(up, x), up(x), atol=1e-5)


def test_loss_falls_and_samples_are_images(images):
    cfg = vae.VAEConfig(epochs=2, **SMALL)
    params = vae.init_params(jax.random.key(0), cfg.latent_dim, cfg.channels)
    before = vae.evaluate_elbo(jax.random.key(5), params, images[:128], cfg)
    params, history = vae.train(jax.random.key(1), images, params, cfg)
    assert len(history) == 2 and history[1] < history[0]
    after = vae.evaluate_elbo(jax.random.key(5), params, images[:128], cfg)
    assert after["test_loss"] < before["test_loss"] - 20  # nats per image
    assert after["test_loss"] == pytest.approx(after["test_bce"] + after["test_kl"])
    s = vae.generate(jax.random.key(2), params, 100, cfg)
    assert s.shape == (100, 28, 28) and s.dtype == np.uint8 and s.max() > s.min()
    b = vae.generate(jax.random.key(2), params, 10, vae.VAEConfig(sample_mode="bernoulli", **SMALL))
    assert set(np.unique(b)) <= {0, 255}


def test_training_resumes_from_epoch_checkpoints(images, tmp_path):
    cfg1 = vae.VAEConfig(epochs=1, **SMALL)
    cfg2 = vae.VAEConfig(epochs=2, **SMALL)
    init = lambda: vae.init_params(jax.random.key(0), 20, SMALL["channels"])  # donated: fresh
    full, h_full = vae.train(jax.random.key(1), images[:96], init(), cfg2)
    _, h1 = vae.train(jax.random.key(1), images[:96], init(), cfg1, workdir=tmp_path)
    assert json.loads((tmp_path / "train_state.json").read_text())["epoch"] == 0
    resumed, h2 = vae.train(jax.random.key(1), images[:96], init(), cfg2, workdir=tmp_path)
    assert h2[:1] == h1 and h2 == pytest.approx(h_full, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), full, resumed)


@pytest.mark.slow  # a whole run (test_smoke keeps one VAE run): the integration tier (CI's -m '')
def test_two_generations_end_to_end(data_dir, tmp_path):
    """Mixing policy with real images (gamma), the run directory, figures and latent spread."""
    model = vae.VAEConfig(
        data_dir=str(data_dir / "mnist"), train_size=128, test_size=64, epochs=1, **SMALL
    )
    cfg = ExperimentConfig(
        name="vae_tiny",
        seed=0,
        model=model,
        generation=GenerationConfig(
            num_generations=2,
            samples_per_generation=None,
            policy="mix",
            alpha=0.75,
            beta=0.0,
            gamma=0.25,
            init_from="scratch",
            keep_params="all",
            num_trials=2,  # two independent chains, one after the other
        ),
    )
    res = loop.run_generations(cfg, tmp_path / "run")
    assert [r["generation"] for r in res.rows] == [0, 1]
    assert "test_loss_se" in res.rows[0]  # summarised over the two chains
    assert all(np.isfinite(r["test_loss"]) and r["test_kl"] > 0 for r in res.rows)
    run = reader.Run(res.run_dir)
    data1 = fileio.load_npz(run.data_path(1))["data"]
    assert data1.shape == (128, 28, 28) and data1.dtype == np.uint8
    learner = loop.make_learner(cfg)
    files = vae_figures.figures(learner, run, tmp_path / "figs")
    assert {f.name for f in files} == {
        "vae_samples.png",
        "vae_latent_density.png",
        "latent_spread.json",
    }
    spreads = json.loads((tmp_path / "figs" / "latent_spread.json").read_text())
    assert len(spreads) == 3 and all(v > 0 for v in spreads.values())


def test_config_validation():
    with pytest.raises(ConfigError, match="model.train_size"):
        vae.VAEConfig(train_size=1)
    with pytest.raises(ConfigError, match="model.learning_rate"):
        vae.VAEConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        vae.train(
            jax.random.key(0),
            np.zeros((4, 28, 27), np.uint8),
            vae.init_params(jax.random.key(0), 20, (8, 16)),
            vae.VAEConfig(**SMALL),
        )
