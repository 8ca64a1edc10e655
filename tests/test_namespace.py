"""Everything installs under the `wesam` namespace: no bare `adapters`, `export`, `service` or
`bench` in an editable install, a wheel or the Bento."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
BARE = ("adapters", "export", "service", "bench")

IMPORT_CHECK = """
import importlib, json, sys
out = {}
for name in ("adapters", "export", "service", "bench"):
    try:
        importlib.import_module(name)
        out[name] = "importable"
    except ModuleNotFoundError:
        out[name] = "absent"
for name in ("wesam.adapters", "wesam.export", "wesam.service", "wesam.bench", "wesam.cli"):
    out[name] = importlib.import_module(name).__file__
print(json.dumps(out))
"""


def _imports(cwd: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    return json.loads(r.stdout.strip().splitlines()[-1])


def _package_dirs() -> dict[str, Path]:
    """Every importable package of the source tree, by the name it installs under."""
    mapping = {"wesam": ROOT / "wesam", **{k: ROOT / v for k, v in SETUPTOOLS["package-dir"].items()}}
    found: dict[str, Path] = {}
    for name, top in mapping.items():
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            pkg = ".".join([name, *rel.parts]) if rel.parts else name
            found.setdefault(pkg, init.parent)
    return found


def test_every_package_folder_is_installed() -> None:
    assert set(_package_dirs()) == set(SETUPTOOLS["packages"])
    assert {f"wesam.{b}" for b in BARE} <= set(SETUPTOOLS["packages"])


def test_editable_install_exposes_only_the_wesam_namespace(tmp_path: Path) -> None:
    got = _imports(tmp_path)
    assert all(got[b] == "absent" for b in BARE), got
    assert Path(got["wesam.adapters"]).parent == ROOT / "adapters"
    assert Path(got["wesam.service"]).parent == ROOT / "service"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("wesam-*.whl")
    return whl


def test_wheel_holds_one_top_level_package(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"wesam", f"wesam-{PYPROJECT['project']['version']}.dist-info"}, tops
    for expected in ("wesam/adapters/lora/model.py", "wesam/service/service.py", "wesam/export/bundle.py",
                     "wesam/bench/serve.py", "wesam/sam/zoo.py", "wesam/pretrain/trainer.py",
                     # the operator's page is package data, not a package
                     "wesam/service/ui/index.html", "wesam/service/ui/app.js", "wesam/service/ui/style.css"):
        assert expected in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    got = _imports(tmp_path, extra_path=site)
    assert all(got[b] == "absent" for b in BARE), got
    assert Path(got["wesam.adapters"]).is_relative_to(site)


def test_bentofile_installs_the_wheel_and_packs_no_bare_folders(tmp_path: Path) -> None:
    import yaml

    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bento["service"].startswith("wesam.service.")
    # Dependencies come from the wheel's metadata (pyproject), not from a second list here.
    assert "packages" not in bento["python"]
    version = PYPROJECT["project"]["version"]
    assert bento["python"]["wheels"] == [f"./dist/wesam-{version}-py3-none-any.whl"]
    for pattern in bento["include"]:
        assert pattern.split("/")[0] not in BARE + ("wesam",), pattern


@pytest.mark.skipif(os.environ.get("WESAM_SKIP_BENTO_BUILD") == "1", reason="WESAM_SKIP_BENTO_BUILD=1")
def test_bento_build(wheel: Path, tmp_path: Path) -> None:
    """A real `bentoml build`: the Bento's sources hold the weights only, wesam comes as a wheel."""
    work = tmp_path / "ctx"
    (work / "dist").mkdir(parents=True)
    (work / "dist" / wheel.name).write_bytes(wheel.read_bytes())
    (work / "models" / "sam-mini").mkdir(parents=True)
    for f in (ROOT / "models" / "sam-mini").iterdir():
        (work / "models" / "sam-mini" / f.name).symlink_to(f)
    (work / "bentofile.yaml").write_text((ROOT / "bentofile.yaml").read_text())
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="True")
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", str(work), "--output", "tag"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (bento_dir,) = [p for p in (tmp_path / "home" / "bentos" / "wesam").iterdir() if p.is_dir()]
    src = {p.relative_to(bento_dir / "src").parts[0] for p in (bento_dir / "src").rglob("*") if p.is_file()}
    assert src == {"models", "bentofile.yaml"}, src  # no Python sources: wesam comes from the wheel
    wheels = list((bento_dir / "env" / "python" / "wheels").glob("wesam-*.whl"))
    assert [w.name for w in wheels] == [wheel.name]
    # The image's install script pip-installs every wheel of the Bento, with its dependencies.
    install = (bento_dir / "env" / "python" / "install.sh").read_text()
    assert 'wheels=($WHEELS_DIR/*.whl)' in install and 'pip_install "${PIP_ARGS[@]}" "${wheels[@]}"' in install
