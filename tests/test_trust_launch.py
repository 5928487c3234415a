"""Hostile cluster values: nothing in a config adds a line or a command to the sbatch script; the check runs at
validation, before any script is written, as one line (rc 2 from `mmfm launch`)."""

import dataclasses
import re
import subprocess

import pytest

from mmfm.cli.launch import main as launch
from mmfm.config import ConfigError, load_config
from mmfm.launch import Job, plan_jobs, render_sbatch
from mmfm.launch.job import check

SLURM = ["cluster=slurm", "cluster.gpus_per_node=0"]


def with_env(cfg, env: dict):
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, env=env))


def test_newline_in_job_name_is_refused_before_any_script(capsys, tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(SystemExit) as exit_info:
        launch(["--dry-run", *SLURM, f"cluster.job_name='x\ntouch {marker}'", f"run_dir={tmp_path}/run"])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""
    assert out.err == (f"mmfm launch: error: cluster.job_name='x\\ntouch {marker}' may hold only letters, digits and "
                       ". _ : + @ % , / = - (it becomes an #SBATCH line); e.g. cluster.job_name=mmfm\n")
    assert not (tmp_path / "run").exists() and not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("cluster.partition='gpu\nrm -rf x'", "cluster.partition='gpu\\nrm -rf x' may hold only letters"),
    ("cluster.account='a;b'", "cluster.account='a;b' may hold only letters"),
    ("cluster.qos='$(id)'", "cluster.qos='$(id)' may hold only letters"),
    ("cluster.mem='64G --output=/x'", "cluster.mem='64G --output=/x' may hold only letters"),
    ("+cluster.env.TOKEN='a\nb'", "cluster.env.TOKEN='a\\nb' holds a newline or another control character"),
    ("cluster.sbatch_flags=['--exclusive\necho hi']", "cluster.sbatch_flags[0]='--exclusive\\necho hi' holds a newline"),
    ("cluster.sbatch_flags=[exclusive]", "cluster.sbatch_flags[0]='exclusive' is not an sbatch option"),
    ("cluster.srun_flags=['--a\nb']", "cluster.srun_flags[0]='--a\\nb' holds a newline"),
    ("cluster.container_image='img\nb'", "cluster.container_image='img\\nb' holds a newline"),
])
def test_bad_cluster_text_names_the_field(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        plan_jobs([*SLURM, override])


@pytest.mark.parametrize("name", ["A;touch x", "1X", "X-Y", "X=Y", ""])
def test_env_names_are_identifiers(name):
    cfg = with_env(load_config(SLURM), {name: "1"})
    with pytest.raises(ConfigError, match=re.escape(f"cluster.env has the variable name {name!r}; environment")):
        check(cfg)


def test_realistic_values_render_and_env_values_stay_data(tmp_path):
    job = plan_jobs([*SLURM, "cluster.partition='gpu,gpu-long'", "cluster.account=proj_a.b", "cluster.qos=high",
                     "cluster.mem=64G", "cluster.job_name=mmfm-vlm7b", "cluster.time=1-00:00:00",
                     "cluster.sbatch_flags=['--constraint=h100&ib']", f"run_dir={tmp_path}/run"])[0]
    value = "a b'c\"$(touch x)`;"
    job = Job(job.overrides, with_env(job.cfg, {"ODD": value}))
    check(job.cfg)
    script = render_sbatch(job)
    assert {"#SBATCH --partition=gpu,gpu-long", "#SBATCH --account=proj_a.b", "#SBATCH --qos=high",
            "#SBATCH --mem=64G", "#SBATCH --job-name=mmfm-vlm7b", "#SBATCH --constraint=h100&ib"} <= \
        set(script.splitlines())
    export = next(line for line in script.splitlines() if line.startswith("export ODD="))
    shown = subprocess.run(["bash", "-c", f'{export}; printf %s "$ODD"'], capture_output=True, text=True,
                           cwd=tmp_path)
    assert shown.stdout == value and not (tmp_path / "x").exists()


def test_local_runs_keep_any_job_name():
    """The #SBATCH allow-list is for Slurm; a local run's job name goes nowhere."""
    check(load_config(["experiment_name=my run"]))
