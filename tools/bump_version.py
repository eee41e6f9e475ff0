"""Move every package to one new version: each __about__.py, the meta-package version, every sibling pin.

Usage: python tools/bump_version.py 0.2.0
"""

from __future__ import annotations

import re
import sys

from check_versions import PACKAGES, PIN, ROOT, mismatches


def bump(new: str) -> None:
    if not re.fullmatch(r"\d+\.\d+\.\d+([a-z0-9.+-]*)", new):
        sys.exit(f"not a version: {new!r}")
    for name in PACKAGES:
        about = ROOT / f"packages/surogate-{name}/src/surogate/{name}/__about__.py"
        about.write_text(f'__version__ = "{new}"\n')
    files = [ROOT / "pyproject.toml"] + [ROOT / f"packages/surogate-{n}/pyproject.toml" for n in PACKAGES]
    for f in files:
        text = PIN.sub(lambda m: f'"{m.group(1)}=={new}"', f.read_text())
        if f.name == "pyproject.toml" and f.parent == ROOT:
            text = re.sub(r'^version = "[^"]+"', f'version = "{new}"', text, count=1, flags=re.M)
        f.write_text(text)
    problems = mismatches()
    if problems:
        sys.exit("\n".join(problems))
    print(f"all packages at {new}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    bump(sys.argv[1])
