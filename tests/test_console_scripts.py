"""Every console script declared in setup.py is installed and runs (--help) from any directory."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_utils import REPO, env

SCRIPTS = re.findall(r'"(rcml-[\w-]+)=([\w.]+):(\w+)"', (REPO / "setup.py").read_text())


def test_setup_declares_the_tools():
    names = {name for name, _, _ in SCRIPTS}
    assert {"rcml-pretrain", "rcml-evaluate", "rcml-build-shards", "rcml-inspect", "rcml-export-init"} <= names


@pytest.mark.parametrize("name, module, func", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_console_script_runs_from_another_directory(name, module, func, tmp_path):
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{name} is not installed: pip install -e . (make install) writes it"
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout
