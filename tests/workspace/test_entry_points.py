import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("script", ["surogate", "surogate-cli"])
def test_help_lists_the_commands(script):
    out = subprocess.run([str(Path(sys.executable).parent / script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("sft", "pt", "tokenize", "merge"):
        assert command in out.stdout


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from surogate.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numba', 'transformers', 'mpi4py') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
