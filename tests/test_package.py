"""The installable package: a wheel built from the sources holds every module of fourdnex, each of them imports from
a folder outside the checkout, and the wheel requires what requirements.txt installs; its subpackages import downward
only, and no module imports itself through others."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fourdnex.model.attention import FLASH_4_INSTALL

ROOT = Path(__file__).resolve().parents[1]


def checkout_modules() -> list[str]:
    """Every module of the package in the checkout, dotted."""
    names = []
    for path in sorted((ROOT / "fourdnex").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel pip builds from a copy of the sources (offline, with the setuptools installed here), and the folder
    pip installed it into with ``--target``."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "fourdnex", source / "fourdnex", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-deps", "--no-index", "--no-build-isolation"]
    build = subprocess.run([*pip, "wheel", *offline, "-w", work / "dist", source], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (work / "dist").glob("fourdnex-*.whl")
    install = [*pip, "install", *offline, "--target", work / "site", wheel]
    install = subprocess.run(install, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    return wheel, work / "site"


def test_the_wheel_holds_every_module_and_each_imports_from_outside_the_checkout(installed, tmp_path):
    wheel, site = installed
    modules = checkout_modules()
    assert {"fourdnex", "fourdnex.evaluation.run", "fourdnex.model.transformer", "fourdnex.train.loop"} <= set(modules)
    with zipfile.ZipFile(wheel) as archive:
        packed = sorted(n for n in archive.namelist() if n.endswith(".py"))
    assert packed == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fourdnex").rglob("*.py"))
    # -I: neither the working directory, PYTHONPATH nor the user's site-packages on sys.path; the installed folder
    # first, so that it wins over any fourdnex installed in this environment
    code = (
        f"import importlib, json, sys; sys.path.insert(0, {str(site)!r}); "
        f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {modules!r}}}))"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(files) == modules
    assert all(Path(f).is_relative_to(site) for f in files.values()), files


def test_the_wheel_requires_what_requirements_txt_installs(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        (name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    required = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    runtime = {canonicalize_name(r.name): r.specifier for r in required if r.marker is None}
    dev = {canonicalize_name(r.name): r.specifier for r in required if str(r.marker) == 'extra == "dev"'}
    fa4 = {str(r.marker): r for r in required if r.marker is not None and str(r.marker) != 'extra == "dev"'}
    assert set(fa4) == {'extra == "fa4"', 'extra == "fa4-cu13"'}  # FlashAttention-4, as the install hint names it
    hint = Requirement(FLASH_4_INSTALL.split('"')[1])
    assert (fa4['extra == "fa4-cu13"'].name, fa4['extra == "fa4-cu13"'].extras) == (hint.name, hint.extras)
    assert fa4['extra == "fa4"'].specifier == fa4['extra == "fa4-cu13"'].specifier == hint.specifier
    assert not fa4['extra == "fa4"'].extras
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    (tools,) = (i for i, line in enumerate(lines) if line.startswith("# development"))  # the extra "dev" follows
    listed = []
    for part in (lines[:tools], lines[tools:]):
        reqs = [Requirement(line) for line in part if line and not line.startswith("#")]
        listed.append({canonicalize_name(r.name): r.specifier for r in reqs})
    assert listed == [runtime, dev]
    assert {"torch", "diffusers", "numpy"} <= set(runtime) and set(dev) == {"pytest", "ruff", "playwright"}
