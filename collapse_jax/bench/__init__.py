"""`collapse-jax bench`: the standard throughput benchmarks on whatever backend JAX sees.

One command measures every part of the project that costs time, prints a table and writes a JSON
report (device, versions, settings, one row per measurement):

- `train_step`: an OPT-125m training step (AdamW, dropout on, bf16 compute, fp32 parameters) at
  the paper's batch of 128 blocks x 64 tokens: tokens/s and MFU. FLOPs per token follow the PaLM
  convention `6 N + 12 L D T` (N = parameters in matmuls: all decoder weights plus the tied token
  embedding / LM head, learned positions excluded; L layers, D width, T = 64 tokens); the peak is
  the device's bf16 dense datasheet figure (`harness.PEAK_TFLOPS`) or, on a CPU, a measured
  matmul peak in the compute dtype. Every report states the convention (`flop_convention`).
- `decode_beam`: the paper's regeneration search (5 beams, 64 new tokens, min 64, repetition
  penalty 3.0) on full 64-token prompts: new tokens/s and the extrapolated time to regenerate
  WikiText-2's 37k training blocks.
- `paper_generation`: one whole generation of the paper's LM experiment on 37k random-token blocks
  with a randomly initialised OPT-125m (fine-tune 5 epochs, evaluate, regenerate), extrapolated
  from measured slices: the train step above x the number of steps, a measured evaluation forward
  x the number of evaluation batches, and the decode rate above x 37k blocks.
- `gaussian_exact`, `gaussian_sample`, `discrete_exact`, `discrete_sample`: the theory chains
  (`simulate`, 10^6 chains in the full suite): chain-generations/s or samples/s.
- `gmm_em`: EM over 10^4 chains (full suite) of the paper's GMM setting, chain-iterations/s.
- `vae_train`: training images/s of the paper's VAE (batch 256).

Every report compares its rows with the aims on one H100 (`targets`: MFU >= 30 %, 37k blocks
regenerated in < 20 s, a paper generation in < 60 s, 10^6 x 100 exact Gaussian generations in
< 1 s of kernel; `comparable` says whether the suite ran at the aim's sizes), and the theory rows
time the device's work and the copy of the results to the host apart (`kernel_s`, `copy_s`).

Baselines run in the same process when their package is installed (transformers/PyTorch for the
LM and the VAE, NumPy for the theory chains, scikit-learn for EM): `ratio` = ours / baseline.
With PyTorch baselines on a GPU, JAX preallocates half of its memory
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.5, unless set) so that PyTorch has room.

Modules: `harness` (timing, the peak-FLOPs table, rows, the report's table), `suites` (the quick
and full suites, `run`), the measurements by area (`lm`, `theory`, `gmm`, `vae`) and `baselines`
(NumPy chains, the PyTorch VAE). `benchmarks/bench_*.py` reuse them. Nothing here is on the
library's import path: the CLI imports it for `collapse-jax bench` only. Library code does not
print: the CLI prints the table.
"""
