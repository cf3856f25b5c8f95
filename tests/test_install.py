"""A normal (non-editable) install: the wheel holds every file of the packages, and installed into
a new virtual environment, run from an empty folder so that the checkout is not what is imported,
``meshpipe`` reads its presets, prints its version and config and runs the demo's first stage."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.config import field_docs
from pipeline.version import _pyproject_version

PACKAGES = ("pipeline", "stages", "tasks")
SOURCE = (*PACKAGES, "run_pipeline.py", "pyproject.toml", "README.md", "LICENSE")
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels itself (no ``wheel`` package), so no download is needed."""
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)


def _call(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources and install it, without its dependencies, into a
    new venv that sees this interpreter's site-packages (a path in a .pth file; their .pth files,
    this checkout's editable install among them, are not run)."""
    tmp = tmp_path_factory.mktemp("install")
    src, dist, venv, cwd = tmp / "src", tmp / "dist", tmp / "venv", tmp / "elsewhere"
    src.mkdir()
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=JUNK)
        else:
            shutil.copy2(ROOT / name, src / name)
    offline = ["--no-build-isolation"] if _setuptools_builds_wheels() else []  # else pip fetches setuptools
    built = _call([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, *offline, src], cwd=tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("meshpipe-*.whl")
    made = _call([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = Path(_call([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).stdout.strip())
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    outer = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"), *user])
             if Path(p).is_dir()]
    (purelib / "_outer_site.pth").write_text("".join(f"{p}\n" for p in outer))
    installed = _call([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel], cwd=tmp)
    assert installed.returncode == 0, installed.stderr
    cwd.mkdir()
    return {"wheel": wheel, "src": src, "venv": venv, "python": python, "meshpipe": venv / "bin" / "meshpipe",
            "cwd": cwd, "purelib": purelib}


def test_wheel_holds_every_file_of_the_packages(install):
    with zipfile.ZipFile(install["wheel"]) as whl:
        names = set(whl.namelist())
    src = install["src"]
    files = {p.relative_to(src).as_posix() for name in PACKAGES for p in (src / name).rglob("*") if p.is_file()}
    assert {"pipeline/presets/default.yaml", "pipeline/presets/fast_cpu.yaml",
            "pipeline/assets/spot/spot_triangulated.obj", "pipeline/assets/spot/spot_texture.png"} <= files
    assert files - names == set(), "files missing from the wheel (declare them in pyproject's package-data)"
    assert "run_pipeline.py" in names
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)
    assert any(n.endswith("/LICENSE") and ".dist-info/" in n for n in names)


def test_installed_package_is_imported_from_the_venv(install):
    out = _call([install["python"], "-c", "import pipeline, run_pipeline, stages, tasks, pipeline.synthetic.mesh as m;"
                 "print(pipeline.__file__); print(run_pipeline.__file__); print(stages.__file__);"
                 "print(tasks.__file__); print(m.ASSET_DIR)"], cwd=install["cwd"])
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert Path(path).resolve().is_relative_to(install["purelib"].resolve()), path


def test_installed_version_and_config(install):
    version = _call([install["meshpipe"], "--version"], cwd=install["cwd"])
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"meshpipe {_pyproject_version(ROOT / 'pyproject.toml')}\n"
    config = _call([install["meshpipe"], "config", "--preset", "fast_cpu"], cwd=install["cwd"])
    assert config.returncode == 0, config.stderr
    lines = config.stdout.splitlines()
    assert lines[lines.index("  max_side: 640") - 1].startswith(f"  # {field_docs('frames')['max_side']}")
    assert f"  # {field_docs('train')['iterations']}" in config.stdout
    bad = _call([install["meshpipe"], "config", "--set", "train.iteratons=5"], cwd=install["cwd"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "train.iteratons" in bad.stderr


def test_installed_demo_runs_its_first_stage(install, tmp_path):
    """The demo's input is rendered by the installed package from its own Spot assets, at a tiny
    size (the demo's own 80 frames take minutes on 2 cores); the demo reuses a finished input."""
    wd = tmp_path / "wd"
    tiny = "from pipeline.synthetic import SceneSpec, generate; import sys; " \
           "generate(sys.argv[1], SceneSpec(num_views=8, width=160, height=120, output='video', supersample=1))"
    made = _call([install["python"], "-c", tiny, wd / "demo_input"], cwd=install["cwd"])
    assert made.returncode == 0, made.stderr
    demo = _call([install["meshpipe"], "demo", "--until", "frames", "--workdir", wd, "--device", "cpu",
                  "--no-progress"], cwd=install["cwd"])
    assert demo.returncode == 0, demo.stderr
    (frames,) = wd.glob("spot/frames-*")
    assert (frames / "manifest.json").is_file() and len(list(frames.glob("images/*.jpg"))) >= 4
    assert "generating" not in demo.stderr
    assert list(install["cwd"].iterdir()) == []
