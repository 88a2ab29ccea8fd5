"""The metrics each experiment exists for (its headline metrics), declared per model kind.

The console table at the end of a run, `collapse-jax report` and `collapse-jax compare` lead with
them; every other metric follows in the order the run recorded it. A kind lists the names its
runs may record: a run shows those it has (a known-language LM run has `kl_to_truth`, a WikiText
run has `valid_ppl`), so one kind serves runs of different data.
"""

from __future__ import annotations

from collections.abc import Iterable

# The language-model kinds: against the known language (`lm.truth`), else the paper's
# perplexities on WikiText.
_LM = (
    "kl_to_truth",
    "tail_retention",
    "data_true_nll_floored",
    "data_true_nll",
    "support_coverage",
    "lost_mass",
    "off_support_mass",
    "valid_ppl",
    "ppl",
)

# kind -> headline metrics, most important first.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    # The paper's Fig. 2 / Thm 3.1: the fitted variance collapses, the distance to the
    # original grows.
    "gaussian": ("w2", "logdet_cov", "trace_cov", "mean_dist2"),
    # Fig. 2's discrete chain: the tails are lost first, the support shrinks to one state.
    "discrete": ("lost_tail_mass", "support_size", "kl_to_original", "absorbed"),
    # Sec. 3.1's GMM: distance to the original mixture and its spread.
    "gmm": ("l2", "log_lik", "cov_trace", "mean_shift"),
    "kde": ("heldout_nll", "variance", "total_variance", "bandwidth"),
    "linear_regression": ("test_mse", "param_error"),
    "vae": ("test_loss", "test_recon_bce", "test_kl"),
    # Dohmatob et al.'s memorising learner: the missing mass is its test error.
    "tails": ("test_error", "seen_tokens"),
    # Feng et al.'s verified self-training: the classifier's error and what the verifier kept.
    "verification": ("test_error", "label_error", "kept_fraction", "cosine"),
    # The LM: against the known language (truth metrics), else the paper's perplexities.
    "opt": _LM,
    # The known-language baselines (the true model, n-gram counts) report the same metrics.
    "oracle": _LM,
    "ngram": _LM,
}


def headline(kind: str, available: Iterable[str]) -> list[str]:
    """The kind's headline metrics among `available`, in the kind's order (empty for a kind
    that declares none)."""
    have = set(available)
    return [m for m in HEADLINE_METRICS.get(kind, ()) if m in have]


def lead_with_headline(kind: str, names: Iterable[str]) -> list[str]:
    """`names` reordered: the kind's headline metrics first (its order), then the rest (theirs)."""
    names = list(dict.fromkeys(names))
    first = headline(kind, names)
    return first + [n for n in names if n not in first]
