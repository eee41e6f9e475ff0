"""Every package's test folder is collected: pytest skips folders matching `norecursedirs`, whose default includes
"dist" and "build" (tests/dist went uncollected that way)."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_test_folder_matches_norecursedirs(pytestconfig):
    patterns = pytestconfig.getini("norecursedirs")
    assert patterns == tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "norecursedirs"
    ], "norecursedirs must be set in pyproject.toml (the default skips tests/dist)"
    folders = [p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))]
    assert "dist" in folders and "workspace" in folders
    skipped = [f for f in folders if any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not skipped, f"tests/{skipped} would never be collected: norecursedirs has a pattern matching them"
