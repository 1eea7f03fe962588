"""The README names tests as its evidence (the Reliability table, the Data and Training sections): every
test it names exists, in the file it names when it names one."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_every_test_the_readme_names_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    defined = {
        path.name: set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
        for path in (ROOT / "tests").glob("test_*.py")
    }
    every = set().union(*defined.values())
    named = re.findall(r"(?:tests/(test_\w+\.py)::)?(?<![\w/])(test_\w+)(?![\w.])", readme)
    assert len(named) >= 30
    missing = sorted(
        f"{file}::{test}" if file else test
        for file, test in named
        if test not in (defined.get(file, set()) if file else every)
    )
    assert not missing, f"README.md names tests that do not exist: {missing}"
