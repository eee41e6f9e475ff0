"""Fail if the five packages and the meta-package are not at one version, or a sibling pin differs from it.

Usage: python tools/check_versions.py   (exit 1 and a list of mismatches if any)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["kernels", "quant", "models", "dist", "cli"]
PIN = re.compile(r'"(surogate-[a-z]+)==([^"]+)"')


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        about = ROOT / f"packages/surogate-{name}/src/surogate/{name}/__about__.py"
        found[f"surogate-{name}"] = re.search(r'__version__ = "([^"]+)"', about.read_text()).group(1)
    found["surogate"] = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return found


def pins() -> list[tuple[Path, str, str]]:
    files = [ROOT / "pyproject.toml"] + [ROOT / f"packages/surogate-{n}/pyproject.toml" for n in PACKAGES]
    return [(f, name, version) for f in files for name, version in PIN.findall(f.read_text())]


def mismatches() -> list[str]:
    found = versions()
    expected = found["surogate"]
    problems = [f"{name} is {v}, expected {expected}" for name, v in found.items() if v != expected]
    problems += [f"{f.relative_to(ROOT)} pins {n}=={v}, expected {expected}" for f, n, v in pins() if v != expected]
    return problems


if __name__ == "__main__":
    problems = mismatches()
    for p in problems:
        print(p)
    if not problems:
        print(f"all packages at {versions()['surogate']}")
    sys.exit(1 if problems else 0)
