"""rundir.fileio: a staged folder replaces its target on success and leaves nothing behind when
its writer is interrupted (an interrupted commit must not leave `.state.cjx*.tmp` in the run)."""

import pytest

from collapse_jax.rundir import fileio


def test_staged_dir_replaces_the_target(tmp_path):
    dst = tmp_path / "state"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with fileio.staged_dir(dst) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_staged_dir_leaves_the_target_and_no_temporary(tmp_path, error):
    dst = tmp_path / "state"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(error):
        with fileio.staged_dir(dst) as tmp:
            (tmp / "half.txt").write_text("half")
            raise error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert (dst / "old.txt").read_text() == "old"
