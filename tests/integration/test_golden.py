"""Results are bit-identical to the golden record (taken on 717aaa0, before the wave-three
refactor) for a shrunk run of every shipped config; see tests/integration/golden_runs.py for
what is recorded and how (rarely, for an intended change of results) to regenerate it."""

import json

import pytest

from tests.integration import golden_runs

pytestmark = [pytest.mark.slow]

GOLDEN = json.loads(golden_runs.GOLDEN.read_text())
CASES = sorted(GOLDEN["cases"])


def test_every_shipped_config_has_a_golden_case(data_dir):
    covered = {config for config, _ in golden_runs.cases(data_dir).values()}
    assert golden_runs.shipped_configs() - covered == set(), "a shipped config has no case"
    assert set(golden_runs.cases(data_dir)) == set(CASES), "cases and golden.json disagree"


def diff(case: str, want: dict, got: dict) -> list[str]:
    """One line per difference, naming the case, run, generation and metric or array."""
    problems = []
    for run in sorted(set(want) | set(got)):
        where = case if run == "." else f"{case}/{run}"
        if run not in got or run not in want:
            problems.append(f"{where}: run directory {'missing' if run not in got else 'new'}")
            continue
        w_rows, g_rows = want[run]["metrics"], got[run]["metrics"]
        if len(w_rows) != len(g_rows):
            problems.append(f"{where}: {len(g_rows)} metrics rows, golden has {len(w_rows)}")
        for w, g in zip(w_rows, g_rows):
            gen = w.get("generation")
            for k in sorted(set(w) | set(g)):
                if w.get(k) != g.get(k):
                    problems.append(
                        f"{where}: generation {gen} metric {k}: {g.get(k)} != golden {w.get(k)}"
                    )
        w_arr, g_arr = want[run]["arrays"], got[run]["arrays"]
        for k in sorted(set(w_arr) | set(g_arr)):
            if k not in g_arr:
                problems.append(f"{where}: array {k} missing")
            elif k not in w_arr:
                problems.append(f"{where}: array {k} not in the golden record")
            elif w_arr[k] != g_arr[k]:
                problems.append(f"{where}: array {k} differs")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_results_match_golden_record(case, data_dir, tmp_path):
    if golden_runs.versions() != GOLDEN["versions"]:
        pytest.skip(
            f"golden record taken with {GOLDEN['versions']}, this is {golden_runs.versions()}"
        )
    got = golden_runs.record(golden_runs.cases(data_dir)[case], tmp_path / "run")
    problems = diff(case, GOLDEN["cases"][case], got)
    assert not problems, "\n".join(problems[:40])
