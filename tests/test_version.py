"""The version is stated once (ion_d2/__init__.py); setup.py and CHANGELOG.md's newest release
give the same."""

import os
import re
import subprocess
import sys

import ion_d2

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_setup_py_and_changelog_give_the_package_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", ion_d2.__version__), ion_d2.__version__

    out = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == ion_d2.__version__

    with open(os.path.join(REPO, "CHANGELOG.md")) as f:
        releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", f.read(), flags=re.MULTILINE)
    assert releases, "CHANGELOG.md has no '## [x.y.z]' release heading"
    assert releases[0] == ion_d2.__version__, (releases[0], ion_d2.__version__)
