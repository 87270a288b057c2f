"""The installed packages are the ones the template was tested with (constraints.txt).

    python -m pytest -q tests/template/test_versions.py

A fresh `pip install -r requirements.txt` resolves to the newest release in each range, which the
tests may never have seen (transformers 5.24 broke --lora_r with the newest peft). This test names
the package that moved and the command that installs the tested set.
"""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent.parent


def requirement_names(*files):
    names = []
    for file in files:
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(Requirement(line).name)
    return names


def pins():
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            found[match[1].lower()] = match[2]
    return found


def test_installed_versions_are_the_tested_ones():
    pinned = pins()
    moved = []
    for name in requirement_names("requirements.txt", "requirements-dev.txt"):
        assert name.lower() in pinned, (
            f"{name} is required but has no exact version in constraints.txt"
        )
        installed = Version(metadata.version(name))
        if Version(installed.base_version) != Version(pinned[name.lower()]):
            moved.append(f"{name} {installed} (tested: {pinned[name.lower()]})")
    assert not moved, (
        "installed versions differ from the tested ones in constraints.txt: "
        + ", ".join(moved)
        + ". Install the tested set with: pip install torch==2.13.0 -r requirements.txt "
        "-r requirements-dev.txt -c constraints.txt (or, if you upgraded on purpose and the "
        "tests pass, update constraints.txt)."
    )


def test_requirement_ranges_admit_the_pinned_versions():
    pinned = pins()
    for file in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                requirement = Requirement(line)
                assert Version(pinned[requirement.name.lower()]) in requirement.specifier, (
                    file,
                    line,
                )


def test_peft_is_new_enough_for_this_transformers():
    from transformers.integrations import peft as integration

    minimum = Version(integration.MIN_PEFT_VERSION)
    assert Version(metadata.version("peft")) >= minimum, (
        f"transformers {metadata.version('transformers')} needs peft >= {minimum} for --lora_r, "
        f"installed {metadata.version('peft')}: install the tested versions with -c constraints.txt"
    )
