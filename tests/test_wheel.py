"""Packaging: the wheel carries the Hydra configs and every console script works from it, outside the checkout.

``test_installed_wheel`` (slow, ~1-2 min on 2 cores) builds the wheel from a copy of the working tree (offline:
no build isolation, the setuptools of this environment), installs it, not editable, into a fresh virtual
environment that borrows this environment's third-party packages through a ``.pth`` file (no torch download; a
``.pth`` file inside a directory added that way is not processed, so the editable hook of this checkout stays
inactive there), then runs the console scripts from an empty temporary directory: a dry run, a user config
directory (``--config-dir``), ``sam3lora-data``, a ``fast_dev_run`` training that writes an adapter, and
``sam3lora-eval`` / ``-predict`` / ``-export`` on that adapter. Every output must land in that directory and the
``sam3lora`` imported must be the installed one.

The fast tests check the configuration that makes this work: the package list names every package of the
checkout, ``pkg://sam3lora.conf`` resolves to ``conf/`` in this (editable) environment, and every third-party
module imported by ``sam3lora`` belongs to a declared distribution.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the build reads: pyproject.toml names README.md (readme), LICENSE (license-files), sam3lora and conf
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "sam3lora", "conf")
SCRIPTS = ("sam3lora-train", "sam3lora-data", "sam3lora-predict", "sam3lora-eval", "sam3lora-export", "sam3lora-demo")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


# ----------------------------------------------------------------------------------------------- fast checks


def test_package_list_names_every_package_of_the_checkout() -> None:
    """``[tool.setuptools] packages`` is a list (sam3lora.conf comes from conf/, which discovery cannot map)."""
    from setuptools import find_packages

    config = pyproject()["tool"]["setuptools"]
    expected = {*find_packages(where=str(ROOT), include=["sam3lora", "sam3lora.*"]), "sam3lora.conf"}
    assert set(config["packages"]) == expected, "update [tool.setuptools] packages in pyproject.toml"
    assert pyproject()["tool"]["setuptools"]["package-dir"] == {"sam3lora.conf": "conf"}
    assert (ROOT / "conf" / "__init__.py").is_file()  # Hydra's pkg:// source requires it


def test_configs_load_as_a_package_in_this_environment() -> None:
    """The CLIs' ``pkg://sam3lora.conf`` resolves to the checkout's conf/ in the editable install."""
    from importlib import resources

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from sam3lora.cli import eval as eval_cli
    from sam3lora.cli import train as train_cli

    assert train_cli.CONF_DIR == eval_cli.CONF_DIR == "pkg://sam3lora.conf"
    try:
        location = Path(str(resources.files("sam3lora.conf")))
    except ModuleNotFoundError:  # an editable install made before conf/ became sam3lora.conf
        pytest.fail("sam3lora.conf is not importable: reinstall (make install, or pip install -e .)")
    assert location.resolve() == (ROOT / "conf").resolve()
    try:
        with initialize_config_module("sam3lora.conf", version_base="1.3"):
            assert compose("train", overrides=["lora=minimal"]).lora.rank == 8
            assert compose("eval").task_name == "eval"
    finally:
        GlobalHydra.instance().clear()


def imported_top_level_modules() -> set[str]:
    """Top-level names of every absolute import in sam3lora/ (module level and inside functions)."""
    names: set[str] = set()
    for path in (ROOT / "sam3lora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"sam3lora", "__future__"}


def test_every_imported_package_is_declared() -> None:
    """Each third-party import maps (importlib.metadata) to a distribution in dependencies or an extra."""
    project = pyproject()["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    declared |= {requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        # a module not installed here (e.g. onnx) is assumed to come from the distribution of the same name
        distributions = {normalise(d) for d in providers.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not declared in pyproject.toml (module: distributions): {missing}"


def test_license() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


# --------------------------------------------------------------------------------- the wheel, installed fresh


def build_wheel(tmp: Path) -> Path:
    """Build from a copy of the working tree, so the checkout gets no build/ or egg-info of its own."""
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--quiet", "--wheel-dir", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("sam3lora-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed (not editable) and this environment's packages visible."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib.stdout.strip(), "_sam3lora_test_base.pth").write_text(ours + "\n")
    # pip comes from this environment through the .pth file and installs into the fresh one (its sys.prefix)
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--quiet", str(wheel)],
        cwd=tmp)
    return venv


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def only_run(parent: Path) -> Path:
    (run_dir,) = parent.iterdir()
    return run_dir


@pytest.mark.slow
def test_installed_wheel(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for path in (ROOT / "conf").rglob("*.yaml"):
        assert f"sam3lora/conf/{path.relative_to(ROOT / 'conf').as_posix()}" in names, path
    for path in (ROOT / "sam3lora").rglob("*.py"):
        assert path.relative_to(ROOT).as_posix() in names, path
    assert "sam3lora/assets/tiny-pretrained/model.safetensors" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: opencv-python-headless" in metadata

    venv = fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"  # an empty directory, as a user's would be
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "SAM3LORA"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", SAM3LORA_HOME=str(work / "home"),
        MPLCONFIGDIR=str(work / "mpl"),
    )
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), script

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run([str(venv / "bin" / args[0]), *args[1:]], cwd=work, env=env)

    # the installed package, configs included, not the checkout
    where = json.loads(run([str(venv / "bin" / "python"), "-c",
                            "import json, sam3lora, importlib.resources as r; "
                            "print(json.dumps([sam3lora.__file__, str(r.files('sam3lora.conf'))]))"],
                           cwd=work, env=env).stdout)
    site = (venv / "lib").resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(site), where
        assert not Path(path).resolve().is_relative_to(ROOT.resolve()), where

    # dry run: the LoRA table of the tiny model, written under ./logs
    out = cli("sam3lora-train", "lora=minimal", "dry_run=true")
    assert "total" in out.stdout
    summary = json.loads((only_run(work / "logs" / "train" / "runs") / "lora_summary.json").read_text())
    assert summary

    # data: a small synthetic set, then validate it
    cli("sam3lora-data", "synthetic", "--out", "data/syn", "--train", "4", "--val", "2", "--size", "224")
    assert "OK" in cli("sam3lora-data", "validate", "data/syn").stdout

    # a user's own config directory beside ours: an experiment (train settings) found with --config-dir
    user = work / "my_conf" / "experiment"
    user.mkdir(parents=True)
    (user / "smoke.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /lora: minimal\n\n"
        "task_name: smoke\ncompare_with_start: false\n"
        "data: {root: data/syn, batch_size: 2, num_workers: 0}\n"
        "module: {metrics: {ap_every_n_epochs: 0}}\n"
    )
    # fast_dev_run: one training and one validation batch; the adapter callback still writes the adapter
    cli("sam3lora-train", "--config-dir", "my_conf", "experiment=smoke", "+trainer.fast_dev_run=true",
        "~callbacks.plots", "~callbacks.lr_monitor", "~logger")
    train_run = only_run(work / "logs" / "smoke" / "runs")
    assert (train_run / "adapter" / "adapter_config.json").is_file() and (train_run / "results.json").is_file()
    overrides = (train_run / ".hydra" / "overrides.yaml").read_text()
    assert "experiment=smoke" in overrides
    adapter = train_run.relative_to(work) / "adapter"  # relative to the working directory, as a user types it

    cli("sam3lora-eval", "model=tiny", "data.root=data/syn", "data.split=val", "limit=2", "device=cpu",
        f"adapters={{ft:{adapter}}}")
    report = json.loads((only_run(work / "logs" / "eval" / "runs") / "metrics.json").read_text())
    assert set(report["models"]) == {"base", "ft"}

    cli("sam3lora-predict", "data/syn/val/images", "--text", "red circle", "--base", "tiny", "--adapter",
        str(adapter), "--out", "preds")
    assert (work / "preds" / "predictions.json").is_file()
    cli("sam3lora-export", "--base", "tiny", "--adapter", str(adapter), "--out", "merged")
    assert (work / "merged" / "config.json").is_file()
    assert "--base" in cli("sam3lora-demo", "--help").stdout  # serving it is tests/test_demo*.py's part

    written = {p.relative_to(work).parts[0] for p in work.iterdir()}
    assert written <= {"logs", "data", "my_conf", "preds", "merged", "home", "mpl"}, written
