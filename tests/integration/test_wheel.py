"""A built wheel carries its configs: it installs into a fresh virtual environment and runs the
quick start from another directory.

The wheel is built from a copy of the package's files (no build output lands in the checkout),
without build isolation, and installed with `--no-deps --no-index` into a venv that sees this
environment's packages (`--system-site-packages`), so nothing is downloaded. The quick start is
shrunk through overrides so that it takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from tests.integration.golden_runs import _QUICKSTART


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_wheel_installs_and_runs_the_quickstart_elsewhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "collapse_jax", src / "collapse_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(src)])  # fmt: skip
    (wheel,) = dist.glob("collapse_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(
        p.relative_to(REPO).as_posix() for p in REPO.glob("collapse_jax/configs/**/*.yaml")
    )
    assert shipped and set(shipped) <= set(names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    # --ignore-installed: this environment may hold the project itself (e.g. editable); the venv
    # gets the wheel's copy whatever is there, and nothing outside the venv is touched.
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--ignore-installed", str(wheel)])  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path
    env["JAX_PLATFORMS"] = "cpu"
    where = _run(
        [str(bin_dir / "python"), "-c", "import collapse_jax; print(collapse_jax.__file__)"],
        cwd=elsewhere,
        env=env,
    )
    assert str(venv) in where.stdout, where.stdout  # the wheel's copy, not the checkout's
    overrides = list(_QUICKSTART)
    cli = str(bin_dir / "collapse-jax")
    _run([cli, "quickstart", *overrides, "--out", "q", "--no-progress"], cwd=elsewhere, env=env)
    metrics = json.loads((elsewhere / "q" / "discrete_zipf" / "metrics.json").read_text())
    assert metrics  # the run wrote its metrics
    # A shipped config by name and by its old repository path, from a folder without configs/.
    for name in ("theory_gaussian", "configs/theory_gaussian.yaml"):
        shown = _run([cli, "show-config", name, *overrides], cwd=elsewhere, env=env)
        assert "name: theory_gaussian" in shown.stdout
