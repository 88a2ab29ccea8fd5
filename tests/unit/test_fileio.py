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


@pytest.mark.parametrize(
    "step, survivor",
    [("set_aside", "old"), ("put_in_place", "new"), ("remove_aside", "new")],
)
def test_replace_dir_interrupted_after_any_step_leaves_one_whole_folder(
    tmp_path, monkeypatch, step, survivor
):
    """An interrupt that lands just after one of replace_dir's steps (the CI failure of stop 27:
    Ctrl-C during the removal of the set-aside folder left `.state.cjx<pid>-old` behind)."""
    dst, src = tmp_path / "state", tmp_path / "staged"
    for folder, text in ((dst, "old"), (src, "new")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
        (folder / "b.txt").write_text(text)
    real_replace, real_remove = fileio.os.replace, fileio.shutil.rmtree
    renames = []

    def replace(a, b):
        real_replace(a, b)
        renames.append(b)
        if (step, len(renames)) in (("set_aside", 1), ("put_in_place", 2)):
            raise KeyboardInterrupt

    def rmtree(path, ignore_errors=False):
        if step == "remove_aside" and not ignore_errors:
            next(p for p in sorted(path.iterdir())).unlink()  # half removed
            raise KeyboardInterrupt
        real_remove(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(fileio.os, "replace", replace)
    monkeypatch.setattr(fileio.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        fileio.replace_dir(src, dst)
    monkeypatch.undo()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["staged", "state"] if survivor == "old" else ["state"])
    assert {p.read_text() for p in dst.iterdir()} == {survivor}
    assert len(list(dst.iterdir())) == 2
