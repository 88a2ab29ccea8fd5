"""One tiny run per learner kind through the command line, in the default tier: it finishes,
every metric is finite, and (with the recorded jax version) it equals the golden record
bit for bit. tests/integration/test_golden.py runs every shipped config the same way."""

import json
import math

import pytest

from tests.integration import golden_runs
from tests.integration.test_golden import diff

GOLDEN = json.loads(golden_runs.GOLDEN.read_text())
# One golden case per model kind (collapse_jax/configs/ as shipped, shrunk): the cheapest of each.
SMOKE = {
    "gaussian": "theory/gaussian_sample",
    "discrete": "theory/discrete_sample",
    "tails": "theory/tails_topk",
    "gmm": "gmm_cpu",
    "kde": "kde_likelihood_filter",
    "linear_regression": "linreg_policies",
    "verification": "verification",
    "vae": "vae_cpu",
    "opt (WikiText)": "lm/opt_wikitext_cpu_keep10",
    "opt (known source)": "lm/truth_markov_beam",
    "oracle": "lm/truth_oracle_beam",
    "ngram": "lm/truth_counts_sample",
}


def test_every_model_kind_has_a_smoke_run():
    from collapse_jax import config as config_lib

    # Test modules register toy kinds of their own; the package's kinds live in collapse_jax.
    registry = config_lib.MODEL_REGISTRY
    kinds = {k for k, v in registry.items() if v[0].startswith("collapse_jax.")}
    assert kinds == {k.split()[0] for k in SMOKE}


@pytest.mark.parametrize("kind", list(SMOKE))
def test_smoke_run(kind, data_dir, tmp_path):
    case = SMOKE[kind]
    got = golden_runs.record(golden_runs.cases(data_dir)[case], tmp_path / "run")
    rows = got["."]["metrics"]
    assert [r["generation"] for r in rows] == [repr(g) for g in range(len(rows))]
    for row in rows:
        for name, value in row.items():
            assert math.isfinite(float(value)), f"{case}: generation {row['generation']} {name}"
    # A case not yet recorded (a new config) is test_golden's to report, not a smoke failure.
    if golden_runs.versions() == GOLDEN["versions"] and case in GOLDEN["cases"]:
        problems = diff(case, GOLDEN["cases"][case], got)
        assert not problems, "\n".join(problems[:40])
