"""`collapse-jax compare` and `collapse-jax report` on shrunk theory runs: the compared runs are
drawn on one axis with the data they recorded (read back from the figure's artists and its JSON),
the report page holds what it promises and renders in a real browser (headless Chromium) with
every image loaded and no console error."""

import json
import os
import pathlib
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

from collapse_jax import cli, plots
from collapse_jax.report import compare, page
from collapse_jax.rundir import events, fileio, reader

SMALL = [
    "generation.num_generations=6",
    "generation.num_trials=64",
    "generation.block_size=3",
    "generation.record_trials=8",
]


def _run(config, out, *overrides):
    argv = ["run", config, *SMALL, *overrides, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    _run("theory_gaussian", d / "replace")
    _run("theory_gaussian", d / "replace_seed1", "seed=1")
    _run("theory/gaussian_mix", d / "mix")
    return d


def _series(run_dir, name):
    return reader.Run(run_dir).series(name)


def test_compare_draws_both_runs_on_one_axis_with_their_data(runs_dir, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert (
        cli.main(["compare", str(runs_dir / "replace"), str(runs_dir / "mix"), "--out", str(out)])
        == 0
    )
    lines = capsys.readouterr().out.split()
    # several headline metrics: one figure each, <stem>-<metric>.png, with their data
    files = [pathlib.Path(p) for p in lines]
    assert [f.name for f in files] == [
        f"cmp-{m}.png" for m in ("w2", "logdet_cov", "trace_cov", "mean_dist2")
    ]
    assert all(f.is_file() and f.with_suffix(".json").is_file() for f in files)

    result = compare.compare([runs_dir / "replace", runs_dir / "mix"], ["mean_dist2"], out)
    assert result.files == [out] and result.notes == []
    (ax,) = result.figures[0].axes  # one axis
    drawn = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(drawn) == {
        "policy=replace",
        "policy=mix, alpha=0.9, gamma=0.1",
        "closed form (policy=replace)",
        "closed form (policy=mix, alpha=0.9, gamma=0.1)",
        "closed form (dashed, in each run's colour)",  # the legend's one entry for both
    }
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "policy=replace",
        "policy=mix, alpha=0.9, gamma=0.1",
        "closed form (dashed, in each run's colour)",
    ]
    for label, folder in (
        ("policy=replace", "replace"),
        ("policy=mix, alpha=0.9, gamma=0.1", "mix"),
    ):
        x, y = drawn[label].get_data()
        np.testing.assert_array_equal(x, _series(runs_dir / folder, "generation"))
        np.testing.assert_array_equal(y, _series(runs_dir / folder, "mean_dist2"))
        run = reader.Run(runs_dir / folder)
        sizes = run.series("sample_size")
        want = plots.expected_curves(run.config, sizes)["mean_dist2"]
        np.testing.assert_allclose(drawn[f"closed form ({label})"].get_ydata(), want)
    # the JSON next to the figure holds the same numbers (and the band: mean +- 2 SE)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["yscale"] == "linear" and data["missing"] == []
    mix = next(ln for ln in data["lines"] if ln["label"].startswith("policy=mix"))
    mean, se = _series(runs_dir / "mix", "mean_dist2"), _series(runs_dir / "mix", "mean_dist2_se")
    np.testing.assert_allclose(mix["mean"], mean)
    np.testing.assert_allclose(mix["hi"], mean + 2 * se)
    assert mix["runs"] == [str(runs_dir / "mix")]


def test_compare_pools_seeds_and_shares_the_closed_form(runs_dir, tmp_path):
    paths = [runs_dir / "replace", runs_dir / "replace_seed1", runs_dir / "mix"]
    result = compare.compare(paths, ["trace_cov"], tmp_path / "t.png")
    data = result.data[0]
    assert [ln["label"] for ln in data["lines"]] == [
        "policy=replace (2 seeds)",
        "policy=mix, alpha=0.9, gamma=0.1",
    ]
    both = np.stack([_series(runs_dir / f, "trace_cov") for f in ("replace", "replace_seed1")])
    np.testing.assert_allclose(data["lines"][0]["mean"], both.mean(0))
    se = both.std(0, ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(data["lines"][0]["hi"], both.mean(0) + 2 * se)

    # the two seeds alone: one line, one closed form (drawn black)
    result = compare.compare(paths[:2], ["trace_cov"], tmp_path / "s.png")
    data = result.data[0]
    assert [ln["label"] for ln in data["lines"]] == ["theory_gaussian (2 seeds)"]
    assert [c["label"] for c in data["closed_form"]] == ["closed form"]
    assert data["closed_form"][0]["shared"]
    (ax,) = result.figures[0].axes
    assert [ln.get_color() for ln in ax.get_lines()] == ["C0", "k"]


def test_compare_notes_a_metric_one_run_lacks_and_refuses_none_in_common(
    runs_dir, tmp_path, capsys
):
    lacking = tmp_path / "lacking"
    shutil.copytree(runs_dir / "mix", lacking)
    for p in (lacking / "generations").glob("gen_*.json"):
        row = fileio.load_json(p)
        fileio.atomic_write_json(p, {k: v for k, v in row.items() if not k.startswith("w2")})
    argv = ["compare", str(runs_dir / "replace"), str(lacking), "--metric", "w2"]
    assert cli.main([*argv, "--out", str(tmp_path / "w.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "note: w2: not recorded by policy=mix, alpha=0.9, gamma=0.1; drawn for the other runs"
    ]
    data = json.loads((tmp_path / "w.json").read_text())
    assert [ln["label"] for ln in data["lines"]] == ["policy=replace"]

    assert cli.main(["compare", str(runs_dir / "replace"), "--metric", "nope"]) == 2
    assert "--metric nope: recorded by none of the runs" in capsys.readouterr().err
    # no metric in common: one line, exit code 2
    bare = tmp_path / "bare"
    shutil.copytree(runs_dir / "mix", bare)
    for p in (bare / "generations").glob("gen_*.json"):
        row = fileio.load_json(p)
        fileio.atomic_write_json(p, {"generation": row["generation"], "other": 1.0})
    assert cli.main(["compare", str(runs_dir / "replace"), str(bare)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the runs have no metric in common" in err[0]
    assert cli.main(["compare", str(tmp_path / "nowhere")]) == 2


def _with_steps_and_examples(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A copy of a run with a metrics.jsonl of training steps and example continuations (as an
    LM run writes them)."""
    shutil.copytree(src, dst)
    recs = []
    for g in range(3):
        for s in range(20):
            rec = {"kind": "step", "generation": g, "run": 0, "epoch": 0, "step": s}
            rec |= {"loss": 3.0 / (1 + s) + g * 0.1, "learning_rate": 1e-3 * (1 - s / 20)}
            rec |= {"grad_norm": 1.0 + 0.1 * s, "tokens_per_second": 5000.0 + s, "time": s}
            if s == 19:
                rec["val_loss"] = 0.4 + g * 0.1
            recs.append(json.dumps(rec))
    (dst / events.METRICS_NAME).write_text("\n".join(recs) + '\n{"kind": "st')
    (dst / "example_continuations.txt").write_text("prompt: the cat <sat>\ngen 0: on the mat\n")
    return dst


def test_report_page_holds_every_part(runs_dir, tmp_path):
    # the run wrote its page at the end (report.enabled defaults to true)
    assert (runs_dir / "mix" / "report.html").is_file()
    run_dir = _with_steps_and_examples(runs_dir / "mix", tmp_path / "mix")
    # a metric that never moves (a flat line): its figure goes to the collapsed section, last
    for p in (run_dir / "generations").glob("gen_*.json"):
        fileio.atomic_write_json(p, {**fileio.load_json(p), "flat_metric": 2.0})
    shutil.copy(run_dir / "figures" / "w2.png", run_dir / "figures" / "flat_metric.png")
    assert cli.main(["report", str(run_dir)]) == 0
    text = (run_dir / "report.html").read_text()
    figures = sorted((run_dir / "figures").glob("*.png"))
    # every figure, plus the training curves, embedded; nothing fetched
    assert text.count('src="data:image/png;base64,') == len(figures) + 1
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for part in (
        "Headline metrics",
        "Changed from the shipped <code>theory/gaussian_mix.yaml</code>",
        "generation.num_trials",
        "Metrics table",
        "Training curves",
        "on the mat",
        'class="bad"',  # the flat metric added above is not in the manifest's files
        "jaxlib",
        'download="metrics.csv"',
    ):
        assert part in text, part
    # headline figures before the collapsed rest
    assert text.index('alt="w2"') < text.index("<details><summary>Other figures")
    assert text.index("<details><summary>Other figures: 2 (1 flat)") < text.index(
        'alt="w2_squared"'
    )
    assert text.index('alt="w2_squared"') < text.index('alt="flat_metric (flat)"')

    # a damaged run directory is reported as such (the edits above are damage too: a fresh copy)
    run_dir = _with_steps_and_examples(runs_dir / "mix", tmp_path / "mix2")
    assert 'class="ok">Verified' in page.build(run_dir)
    gen = run_dir / "generations" / "gen_00002.json"
    gen.write_text(gen.read_text().replace("0", "1", 1))
    text = page.build(run_dir)
    assert 'class="bad"' in text and "gen_00002.json" in text


def test_report_of_a_suite_folder_writes_every_experiments_page(runs_dir, capsys):
    for sub in ("replace", "replace_seed1", "mix"):
        (runs_dir / sub / "report.html").unlink()
    assert cli.main(["report", str(runs_dir)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [
        str(runs_dir / s / "report.html") for s in ("mix", "replace", "replace_seed1")
    ]
    assert all(pathlib.Path(p).is_file() for p in written)
    assert cli.main(["report", str(runs_dir), "--out", "x.html"]) == 2


def test_a_failed_report_warns_in_one_line(runs_dir, tmp_path, monkeypatch, capsys):
    def broken(path):
        raise ValueError("disk\nfull")

    monkeypatch.setattr(page, "build", broken)
    assert cli.write_report_or_warn(runs_dir / "mix") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "disk full" in err[0]
    # nor does it fail a run
    _run("theory_gaussian", runs_dir / "replace")
    assert "warning" in capsys.readouterr().err


def test_sweep_report_has_grid_heatmaps_and_points(tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "theory_gaussian",
        *SMALL,
        "seed=0,1",
        "generation.samples_per_generation=20,50",
    ]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    text = (out / "report.html").read_text()
    assert "Grid (last generation of every point" in text
    assert text.count('class="ok">verified') == 4
    heat = text.index('alt="w2_heatmap"')
    assert heat < text.index('alt="w2_curves"')
    # compare takes the sweep's points (the seeds pooled)
    result = compare.compare([out], ["w2"], tmp_path / "sw.png")
    labels = [ln["label"] for ln in result.data[0]["lines"]]
    assert labels == [f"samples_per_generation={m} (2 seeds)" for m in (20, 50)]


# --------------------------------------------------------------------------------------------
# The page in a real browser.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Written into the page's <head> for the test only (the page itself has no script): records
# every error event (scripts, images that fail) and console.error call, and on load writes the
# state of every image into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__cjx = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? 'resource ' + e.target.tagName : '';
  window.__cjx.push(String(e.message || t || 'error'));
}, true);
var __ce = console.error;
console.error = function () {
  window.__cjx.push([].join.call(arguments, ' '));
  __ce.apply(console, arguments);
};
window.addEventListener('load', function () {
  var imgs = [].map.call(document.images, function (i) {
    return {alt: i.alt, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth};
  });
  var p = document.createElement('pre');
  p.id = 'cjx-probe';
  var json = JSON.stringify({images: imgs, errors: window.__cjx});
  p.textContent = 'CJX' + 'PROBE' + json + 'CJX' + 'END';  // split: the markers are not in here
  document.body.appendChild(p);
});
</script>"""


def _chromium(*args, tmp: pathlib.Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian's `chromium` package; .ci/run installs it when it can)",
)
def test_report_renders_in_chromium_with_every_image_and_no_console_error(runs_dir, tmp_path):
    run_dir = _with_steps_and_examples(runs_dir / "mix", tmp_path / "mix")
    report = page.write_report(run_dir)
    text = report.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    res = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri(), tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CJXPROBE" in res.stdout, res.stderr[-2000:]
    probe = json.loads(res.stdout.split("CJXPROBE", 1)[1].split("CJXEND", 1)[0])
    assert len(probe["images"]) == text.count("<img ") > 5
    assert [i["alt"] for i in probe["images"] if not i["ok"]] == []
    assert probe["errors"] == []
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console

    shot = tmp_path / "report.png"
    res = _chromium(
        "--hide-scrollbars",
        "--window-size=1280,2400",
        f"--screenshot={shot}",
        report.as_uri(),
        tmp=tmp_path,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    keep = os.environ.get("COLLAPSE_JAX_KEEP_SCREENSHOT")  # to look at it
    if keep:
        shutil.copy(shot, keep)
