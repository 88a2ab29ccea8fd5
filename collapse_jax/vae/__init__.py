"""The paper's convolutional VAE on MNIST: `model` (the network, its config, training, sampling
and evaluation), `mnist` (the data), `learner` (`VAELearner`, the generational loop's learner) and
`figures` (sample grids and latent densities of a run)."""
