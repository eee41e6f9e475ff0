import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    spec.loader.exec_module(module)
    return module


def test_versions_in_lockstep():
    assert load("check_versions").mismatches() == []


def test_bump_rewrites_every_version_and_pin(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "tools", copy / "tools")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    for p in (ROOT / "packages").iterdir():
        (copy / "packages" / p.name).mkdir(parents=True)
        shutil.copy(p / "pyproject.toml", copy / "packages" / p.name / "pyproject.toml")
        src = p / "src" / "surogate"
        for about in src.glob("*/__about__.py"):
            dest = copy / "packages" / p.name / about.relative_to(p)
            dest.parent.mkdir(parents=True)
            shutil.copy(about, dest)
    out = subprocess.run([sys.executable, "tools/bump_version.py", "9.8.7"], cwd=copy, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    check = subprocess.run([sys.executable, "tools/check_versions.py"], cwd=copy, capture_output=True, text=True)
    assert check.returncode == 0 and "9.8.7" in check.stdout
    assert '"surogate-kernels==9.8.7"' in (copy / "packages/surogate-cli/pyproject.toml").read_text()
    # and a stray mismatch is caught
    about = copy / "packages/surogate-quant/src/surogate/quant/__about__.py"
    about.write_text('__version__ = "9.8.6"\n')
    check = subprocess.run([sys.executable, "tools/check_versions.py"], cwd=copy, capture_output=True, text=True)
    assert check.returncode == 1 and "surogate-quant is 9.8.6" in check.stdout


def test_installed_versions_match_source():
    import importlib.metadata as md

    expected = load("check_versions").versions()["surogate"]
    for name in ["kernels", "quant", "models", "dist", "cli"]:
        assert md.version(f"surogate-{name}") == expected


def test_no_namespace_init():
    for p in (ROOT / "packages").glob("*/src/surogate"):
        assert not (p / "__init__.py").exists(), f"{p} must stay a PEP 420 namespace"
