"""The README and docs/: CI runs exactly the README's full test command, and every relative link
of the README and the docs pages names a file that exists."""

import re

from tests.conftest import REPO


def test_ci_runs_the_readmes_full_test_command():
    command = (REPO / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    readme = (REPO / "README.md").read_text()
    assert command.startswith("pip install") and command in readme.splitlines()
    assert "-m ''" in command  # every tier, not the default fast one


def test_relative_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"
