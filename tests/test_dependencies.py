"""The dependency lower bounds of pyproject.toml are the versions CI tests (issue #15).

`make venv` installs every `name>=X` of pyproject.toml as `name==X` (a pip constraints file), torch and
torchvision from the Makefile's TORCH. These tests fail when a bound and what is installed part ways: a
bound raised without reinstalling, or a venv built by other means.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version

from tests.conftest import ROOT


def requirements() -> dict[str, str]:
    """{distribution name: lower bound} of the project's dependencies and its `dev` extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", req.strip())
        assert m, f"pyproject.toml: {req!r} is not of the form name>=X.Y.Z (the tested version)"
        out[m[1]] = m[2]
    return out


def test_every_lower_bound_is_the_installed_version() -> None:
    reqs = requirements()
    assert {"torch", "deepspeed", "webdataset", "torch-fidelity", "pytest"} <= set(reqs)
    # A CUDA build of torch carries a local version (2.14.1+cu128): the release is what is compared.
    wrong = {n: (b, version(n)) for n, b in reqs.items() if version(n).split("+")[0] != b}
    assert not wrong, f"lower bound vs installed: {wrong}; rebuild the venv (make clean venv)"


def test_the_makefile_installs_the_torch_of_the_lower_bounds() -> None:
    torch_line = next(
        line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("TORCH ?=")
    )
    reqs = requirements()
    assert torch_line.split("?=")[1].split() == [
        f"torch=={reqs['torch']}",
        f"torchvision=={reqs['torchvision']}",
    ]
