"""collapse-jax: the experiments of "AI models collapse when trained on recursively generated data"
(Shumailov et al., Nature 631, 2024) in JAX."""

__version__ = "0.1.0"
