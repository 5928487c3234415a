"""A plain, non-editable install: the wheel holds what mmfm reads at run time (configs, launch templates, CUDA
source), and the installed `mmfm` works from a folder outside the repository. Also the env overrides of the
config tree and of the launch templates."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mmfm.config import ConfigError, load_config
from mmfm.config.load import PACKAGE_CONFIGS
from mmfm.launch import LaunchError, plan_jobs, render_sbatch
from mmfm.launch.template import TEMPLATES

REPO = Path(__file__).resolve().parents[1]
# neither the checkout nor a config/template folder set for the test run may leak into the installed mmfm
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMFM_CONFIG_DIR", "MMFM_LAUNCH_DIR")}
CLEAN_ENV.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")


def run(*cmd, cwd) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def build_wheel(tmp_path: Path) -> Path:
    # a copy of what an sdist holds, so the build's build/ and mmfm.egg-info/ stay out of the checkout (and a
    # stale build/lib there cannot add files to the wheel)
    src = tmp_path / "src"
    shutil.copytree(REPO / "mmfm", src / "mmfm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src,
        cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mmfm-*.whl")
    return wheel


def make_venv(path: Path) -> Path:
    """A fresh virtualenv that sees this interpreter's packages (torch, hydra, pip, ...) but not its mmfm; returns
    its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True)
    purelib = Path(run(path / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=path).strip())
    # --system-site-packages reaches the base interpreter's packages only, not those of a virtualenv running the
    # tests: list this interpreter's site-packages in a .pth (whose own .pth files, an editable mmfm's among them,
    # Python then does not run)
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "outer_site_packages.pth").write_text("".join(f"{d}\n" for d in dict.fromkeys(dirs)))
    return purelib


def test_wheel_install_works_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mmfm/configs/config.yaml", "mmfm/configs/model/tiny_vlm.yaml", "mmfm/launch/templates/sbatch.sh",
            "mmfm/launch/templates/torchrun_rank.sh", "mmfm/kernels/csrc/rms_norm.cu"} <= names
    # every run-time file of the checkout's package (all but Python and Markdown) is in the wheel
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "mmfm").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc", ".md")}
    assert data <= names, sorted(data - names)
    assert {n.split("/")[0] for n in names} == {"mmfm", "mmfm-0.1.0.dist-info"}  # one top-level package

    venv = tmp_path / "venv"
    purelib = make_venv(venv)
    run(venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel,
        cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = run(venv / "bin/python", "-c", "import mmfm; print(mmfm.__file__)", cwd=elsewhere).strip()
    assert Path(imported) == purelib / "mmfm/__init__.py"

    mmfm = venv / "bin/mmfm"  # the console script the wheel installed
    job = run(mmfm, "train", "--cfg", "job", "experiment=demo", "data.batch_size=5", cwd=elsewhere)
    assert "experiment_name: demo" in job and "  max_steps: 1400" in job  # from configs/experiment/demo.yaml
    assert "  intermediate_size: 352" in job and "  batch_size: 5" in job

    script = run(mmfm, "launch", "--dry-run", "cluster=slurm", "cluster.gpus_per_node=0", f"run_dir={tmp_path}/run",
                 cwd=elsewhere)
    assert f"--no-python bash {purelib}/mmfm/launch/templates/torchrun_rank.sh " in script
    assert "#SBATCH --signal=B:USR1@" in script

    run(mmfm, "data", "synth", "--out", "d", "--train-size", "24", "--val-size", "6", "--shard-size", "10",
        "--image-size", "32", cwd=elsewhere)
    manifest = json.loads((elsewhere / "d/manifest.json").read_text())
    assert {k: (v["samples"], len(v["shards"])) for k, v in manifest["splits"].items()} == \
        {"train": (24, 3), "val": (6, 1)}
    assert manifest["generator"] == "mmfm data synth" and manifest["mmfm_version"] == "0.1.0"


def test_config_dir_override(tmp_path, monkeypatch):
    tree = tmp_path / "site_configs"
    shutil.copytree(PACKAGE_CONFIGS, tree)
    (tree / "cluster/mysite.yaml").write_text("kind: slurm\npartition: big\ngpus_per_node: 4\n")
    monkeypatch.setenv("MMFM_CONFIG_DIR", str(tree))
    cluster = load_config(["cluster=mysite"]).cluster
    assert (cluster.kind, cluster.partition, cluster.gpus_per_node) == ("slurm", "big", 4)
    monkeypatch.setenv("MMFM_CONFIG_DIR", str(tmp_path / "nowhere"))  # set but wrong: an error, not the package's
    with pytest.raises(ConfigError, match=f"^no config.yaml in {tmp_path}/nowhere: point MMFM_CONFIG_DIR at a "
                                          "folder with config.yaml"):
        load_config([])
    monkeypatch.delenv("MMFM_CONFIG_DIR")
    monkeypatch.setattr("mmfm.config.load.PACKAGE_CONFIGS", tmp_path / "gone")  # an install without its data
    with pytest.raises(ConfigError, match="gone: the mmfm installation is incomplete; reinstall mmfm$"):
        load_config([])


def test_launch_dir_override(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    with open(folder / "sbatch.sh", "a") as f:
        f.write("# site epilogue\n")
    monkeypatch.setenv("MMFM_LAUNCH_DIR", str(folder))
    job = plan_jobs(["cluster=slurm", "cluster.gpus_per_node=0", f"run_dir={tmp_path}/run"])[0]
    script = render_sbatch(job)
    assert script.endswith("# site epilogue\n") and f"bash {folder}/torchrun_rank.sh " in script
    monkeypatch.setenv("MMFM_LAUNCH_DIR", str(tmp_path))
    with pytest.raises(LaunchError, match=f"^no sbatch.sh in {tmp_path}: point MMFM_LAUNCH_DIR at a folder"):
        render_sbatch(job)
