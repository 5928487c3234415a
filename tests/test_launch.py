"""`mmfm launch`: the sbatch script and torchrun command it renders, cluster validation, sweep expansion, the batch
script's preemption logic (with stand-ins for srun and scontrol), and a local sweep over two parallel layouts."""

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from conftest import SMALL_MODEL
from mmfm.cli.launch import main as launch
from mmfm.config import ConfigError, load_config
from mmfm.config.validate import slurm_time_s
from mmfm.launch import LaunchError, plan_jobs, render_sbatch, submit
from mmfm.launch.sweep import expand_sweep
from mmfm.launch.template import render
from mmfm.parallel import ParallelDims
from mmfm.train.metrics import read_metrics

# The example of docs/launching.md: the 7B layout on 16 nodes x 8 GPUs, FSDP over 16 x tensor parallel 8.
SIXTEEN_NODES = ["cluster=slurm", "cluster.nodes=16", "cluster.partition=gpu", "cluster.account=mmfm",
                 "cluster.time=2-00:00:00", "model=vlm_7b", "parallel=fsdp2_tp2", "parallel.dp_shard=16",
                 "parallel.tp=8", "train.precision=bf16", "data.seq_len=2048", "data.batch_size=4",
                 "data.path=/shared/data/synth", "experiment_name=vlm7b", "run_dir=/shared/runs/vlm7b-16n"]


def job_overrides(data, steps=4):
    """A short run of the small test model: the jobs the local and Slurm launch tests start."""
    return [*SMALL_MODEL, f"data.path={data}", f"train.max_steps={steps}", "train.schedule.warmup_steps=1",
            "data.batch_size=8", "logger.log_every=1", "logger.wandb.enabled=false", "logger.progress_bar=false",
            "eval.num_samples=0", "train.val_every=0"]


def dry_run(capsys, *overrides) -> str:
    assert launch(["--dry-run", *overrides]) == 0
    return capsys.readouterr().out


def test_sixteen_node_sbatch_script(capsys):
    script = dry_run(capsys, *SIXTEEN_NODES)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=16", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--mem=0",
                      "--partition=gpu", "--account=mmfm", "--time=2-00:00:00", "--signal=B:USR1@300",
                      "--requeue", "--open-mode=append", "--output=/shared/runs/vlm7b-16n/logs/slurm-%j.out",
                      f"--chdir={os.getcwd()}", "--job-name=mmfm-vlm7b"):
        assert f"#SBATCH {directive}" in lines
    assert not any(line.startswith("#SBATCH --qos") for line in lines)  # unset: left out
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert ('  --rdzv-backend=c10d --rdzv-endpoint="$head:29500" --rdzv-id="$SLURM_JOB_ID" \\') in lines
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8 \\' in script
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\" in lines
    assert "  --cpus-per-task=64 \\" in lines
    assert "export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8" in lines  # 64 CPUs shared by 8 ranks
    assert "export NCCL_DEBUG=WARN" in lines
    assert """trap 'echo "mmfm launch: pre-timeout signal, asking the ranks to checkpoint"; touch "$request"' USR1""" \
        in lines
    assert '    scontrol requeue "$SLURM_JOB_ID"' in lines
    assert "-m mmfm.cli.main train \\" in script and "  run_dir=/shared/runs/vlm7b-16n &" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_optional_cluster_fields_render(capsys):
    script = dry_run(capsys, "cluster=slurm", "cluster.gpus_per_node=0", "cluster.procs_per_node=2",
                     "cluster.cpus_per_task=0", "cluster.mem=", "cluster.time=", "cluster.signal_lead_s=0",
                     "cluster.requeue=false", "cluster.qos=high",
                     "cluster.container_image='nvcr.io#nvidia/pytorch:24.05-py3'",
                     "cluster.container_mounts=/data:/data", "cluster.python=python",
                     "cluster.setup=[module load cuda/12.4,source /opt/env.sh]", "cluster.sbatch_flags=[--exclusive]",
                     "cluster.srun_flags=['--cpu-bind=none']", "+cluster.env.NCCL_SOCKET_IFNAME=ib0", "parallel=fsdp2")
    lines = script.splitlines()
    for absent in ("--gpus-per-node", "--cpus-per-task", "--mem", "--time", "--signal"):
        assert not any(line.startswith(f"#SBATCH {absent}") for line in lines), absent
    assert {"#SBATCH --qos=high", "#SBATCH --no-requeue", "#SBATCH --exclusive", "module load cuda/12.4",
            "source /opt/env.sh", "export NCCL_SOCKET_IFNAME=ib0", "requeue=false"} <= set(lines)
    assert (f"  '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' --container-workdir={os.getcwd()} "
            "--container-mounts=/data:/data --cpu-bind=none \\") in lines
    assert "  python -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc-per-node=2 \\" in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_local_dry_run_prints_the_torchrun_command(capsys, tmp_path):
    out = dry_run(capsys, "parallel=fsdp2", f"run_dir={tmp_path}/run")
    assert "-m torch.distributed.run --standalone --nproc-per-node=2 --no-python bash " in out
    assert f"/mmfm/launch/templates/torchrun_rank.sh {tmp_path}/run/logs " in out
    assert out.strip().endswith(f"-m mmfm.cli.main train parallel=fsdp2 run_dir={tmp_path}/run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["cluster=slurm", "cluster.nodes=2", "parallel=fsdp2"],
     "cluster.nodes=2 x 8 processes per node (cluster.gpus_per_node) = 16, but parallel dims"),
    (["cluster=slurm", "cluster.gpus_per_node=0", "cluster.nodes=4", "parallel=fsdp2"],
     "cluster.nodes=4 x 0 processes per node (cluster.procs_per_node) = 0, but parallel dims"),
    (["cluster.nodes=2", "parallel=fsdp2"],
     "cluster.nodes=2 but cluster.kind=local runs on this machine only; use cluster=slurm"),
    (["cluster=slurm", "cluster.gpus_per_node=0", "cluster.time=4:00"],
     "cluster.signal_lead_s=300 is not shorter than cluster.time=4:00"),
    (["cluster=slurm", "cluster.gpus_per_node=0", "cluster.time=soon"], "cluster.time='soon' is not a Slurm time"),
    (["cluster.kind=pbs"], "cluster.kind='pbs' is unknown"),
    (["cluster.master_port=80"], "cluster.master_port=80 must lie in [1024, 65535]"),
    (["cluster=slurm", "cluster.nodes=3", "cluster.gpus_per_node=2", "parallel.dp_shard=-1", "parallel.tp=2",
      "parallel.pp=2"],
     "parallel.dp_shard=-1 takes the rest of the world, but the world of 6 process(es) (cluster.nodes=3 x "
     "cluster.gpus_per_node=2) does not divide by the other dims (tp=2 x pp=2 = 4); change parallel.*"),
    (["parallel.dp_shard=-1"],
     "parallel.dp_shard=-1 takes the rest of the world, but the world size is unknown: cluster.procs_per_node=0 and "
     "cluster.gpus_per_node=0; set cluster.procs_per_node=N (processes per node) or, on GPU nodes, "
     "cluster.gpus_per_node=N"),
    (["parallel=auto"], "parallel=auto plans for the device count, which is unknown here: cluster.procs_per_node=0"),
    (["parallel=auto", "parallel.tp=2", "cluster.procs_per_node=2"],
     "parallel.auto=true chooses every dim, but parallel.tp=2 is fixed; drop that override"),
])
def test_bad_cluster_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        plan_jobs(overrides)


# 16 nodes x 8 H100: 128 processes for parallel=auto and parallel.dp_shard=-1 to resolve.
NODES_16X8 = ["cluster=slurm", "cluster.nodes=16", "cluster.gpus_per_node=8", "model=vlm_7b", "hardware=h100",
              "data.seq_len=2048"]


def rank_overrides(script: str) -> list[str]:
    """The overrides the script's torchrun passes to every rank's `mmfm train`, unquoted."""
    block = script.split("-m mmfm.cli.main train \\\n", 1)[1].split(" &\n", 1)[0]
    return [shlex.split(line.rstrip(" \\"))[0] for line in block.splitlines()]


def test_parallel_auto_pins_the_planners_top_layout_for_128_gpus(capsys, tmp_path):
    from mmfm.plan.report import layout_overrides
    from mmfm.plan.search import Workload, search

    assert launch(["--dry-run", *NODES_16X8, "parallel=auto", "data.batch_size=4", f"run_dir={tmp_path}/run"]) == 0
    out = capsys.readouterr()
    ranks = rank_overrides(out.out)
    run = load_config(ranks)  # what every rank composes: no planning left, parallel.auto=false
    dims = ParallelDims.from_config(run.parallel)
    assert dims.world_size == 128 and run.parallel.auto is False and run.train.precision == "bf16"
    assert ranks[-1] == f"run_dir={tmp_path}/run" and "parallel=auto" in ranks and "data.batch_size=4" not in ranks
    # the global batch: data.batch_size 4 x grad_accum 1 x 128 devices, kept by the plan's micro-batching
    assert run.train.global_batch == 512 == run.data.batch_size * run.train.grad_accum_steps * dims.dp_size
    # the layout is `mmfm plan model=vlm_7b hardware=h100 devices=128 global_batch=512 seq_len=2048`'s first
    best = search(load_config(["model=vlm_7b", "train.precision=bf16"]), Workload(128, 512, 2048)).plans[0]
    lay = best.layout
    assert (dims.tp, dims.pp, dims.dp_replicate, dims.dp_shard) == (lay.tp, lay.pp, lay.dp_replicate, lay.dp_shard)
    assert set(layout_overrides(lay)) <= set(ranks)  # micro-batch, accumulation, checkpointing as the plan says
    assert "#SBATCH --nodes=16" in out.out and '--nnodes="$SLURM_NNODES" --nproc-per-node=8 \\' in out.out
    note = out.err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"mmfm: parallel=auto chose tp={lay.tp} pp={lay.pp} ")
    assert (f"on 128 x h100 (cluster.nodes=16 x cluster.gpus_per_node=8), global batch 512 x 2048 tokens: predicted "
            f"step {best.time['step']:.3g} s, MFU {best.mfu:.1%}") in note[0]


def test_dp_shard_minus_one_takes_the_rest_of_128_gpus(capsys, tmp_path):
    script = dry_run(capsys, *NODES_16X8, "parallel.dp_shard=-1", "parallel.tp=8", "train.precision=bf16",
                     f"run_dir={tmp_path}/run")
    ranks = rank_overrides(script)
    assert "parallel.dp_shard=16" in ranks and "parallel.dp_shard=-1" not in ranks and "parallel.tp=8" in ranks
    dims = ParallelDims.from_config(load_config(ranks).parallel)
    assert dims.sizes == {"pp": 1, "dp_replicate": 1, "dp_shard": 16, "cp": 1, "tp": 8} and dims.world_size == 128
    assert capsys.readouterr().err == ""  # a -1 dim is resolved silently


def test_parallel_auto_says_in_one_line_when_nothing_fits(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        launch(["--dry-run", "cluster=slurm", "cluster.gpus_per_node=1", "parallel=auto", "model=vlm_7b",
                "hardware=a100_80gb", "data.seq_len=2048", "data.batch_size=2", f"run_dir={tmp_path}/run"])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == "" and len(out.err.strip().splitlines()) == 1
    assert out.err.startswith(
        "mmfm launch: error: parallel=auto on 1 device(s) (cluster.nodes=1 x cluster.gpus_per_node=1), global batch 2 "
        "(data.batch_size=2 x train.grad_accum_steps=1 x 1 device(s)) x 2048 tokens: nothing fits in 72.0 GiB per "
        "device (a100_80gb, 80 GiB less the reserve): the least-memory layout (tp=1 pp=1 dp_replicate=1 dp_shard=1 "
        f"micro-batch=1 ckpt=full) needs {least_memory_gib(['model=vlm_7b', 'hardware=a100_80gb'], 2, 2048):.1f} GiB")


def least_memory_gib(overrides, global_batch, seq_len, devices=1):
    """The planner's least-memory layout's total for the job, in GiB."""
    from mmfm.config import load_config
    from mmfm.plan.search import Workload, search

    cfg = load_config([*overrides, "train.precision=bf16"])
    return search(cfg, Workload(devices, global_batch, seq_len)).closest.memory["total"] / 2**30


def test_local_dp_shard_minus_one_takes_the_processes_per_node(capsys, tmp_path):
    out = dry_run(capsys, "parallel.dp_shard=-1", "cluster.procs_per_node=2", f"run_dir={tmp_path}/run")
    assert "--nproc-per-node=2 " in out
    assert out.strip().endswith(f"train cluster.procs_per_node=2 parallel.dp_shard=2 run_dir={tmp_path}/run")


def test_slurm_time_limits():
    assert [slurm_time_s(t) for t in ("30", "30:15", "04:00:00", "2-12", "2-12:30", "1-00:00:01", "UNLIMITED")] == \
        [1800, 1815, 14400, 216000, 217800, 86401, float("inf")]
    assert [slurm_time_s(t) for t in ("", "1:2:3:4", "-5", "1h")] == [None] * 4


def test_sbatch_missing_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    job = plan_jobs(["cluster=slurm", "cluster.gpus_per_node=0", f"run_dir={tmp_path}/run"])[0]
    with pytest.raises(LaunchError, match="sbatch is not on PATH: run `mmfm launch` on a Slurm login node, use "
                                          "cluster=local"):
        submit(job)
    with pytest.raises(SystemExit) as exit_info:
        launch(["cluster=slurm", "cluster.gpus_per_node=0", f"run_dir={tmp_path}/run"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("mmfm launch: error: sbatch is not on PATH")


def test_sweep_expands_like_hydra(tmp_path):
    fixed, jobs = expand_sweep(["parallel=single,fsdp2", "seed=1", "train.optim.lr=1e-3,2e-3"])
    assert fixed == ["seed=1"]
    assert jobs == [["parallel=single", "train.optim.lr=0.001"], ["parallel=single", "train.optim.lr=0.002"],
                    ["parallel=fsdp2", "train.optim.lr=0.001"], ["parallel=fsdp2", "train.optim.lr=0.002"]]
    assert expand_sweep(["seed=range(0,3)"])[1] == [["seed=0"], ["seed=1"], ["seed=2"]]
    planned = plan_jobs(["parallel=single,fsdp2", "seed=range(0,2)", f"run_dir={tmp_path}"], multirun=True)
    assert [job.run_dir for job in planned] == [tmp_path / name for name in (
        "parallel=single,seed=0", "parallel=single,seed=1", "parallel=fsdp2,seed=0", "parallel=fsdp2,seed=1")]
    assert [(job.cfg.parallel.dp_shard, job.cfg.seed, job.procs_per_node) for job in planned] == \
        [(1, 0, 1), (1, 1, 1), (2, 0, 2), (2, 1, 2)]
    with pytest.raises(ConfigError, match="--multirun given but no override sweeps a value"):
        plan_jobs(["seed=1"], multirun=True)


def test_slurm_sweep_dry_run_prints_one_script_per_job(capsys, tmp_path):
    out = dry_run(capsys, "-m", "cluster=slurm", "cluster.gpus_per_node=0", "parallel=single,fsdp2",
                  f"run_dir={tmp_path}/sweep")
    scripts = out.split("# ---- job ")[1:]
    assert [s.splitlines()[0] for s in scripts] == [f"1/2: {tmp_path}/sweep/parallel=single",
                                                    f"2/2: {tmp_path}/sweep/parallel=fsdp2"]
    assert ["--nproc-per-node=1 \\" in scripts[0], "--nproc-per-node=2 \\" in scripts[1]] == [True, True]
    # quoted for Hydra (the = and , of the name), then for bash
    assert f"""  'run_dir="{tmp_path}/sweep/parallel=fsdp2"' &""" in scripts[1].splitlines()
    assert not (tmp_path / "sweep").exists()


def test_render_leaves_out_empty_directives_and_blocks():
    template = "#SBATCH --qos={{ qos }}\n#SBATCH --nodes={{ nodes }}\n{{ setup }}\nsrun \\\n  {{ flags }} \\\n  run\n"
    assert render(template, {"qos": "", "nodes": "2", "setup": "", "flags": ""}) == \
        "#SBATCH --nodes=2\nsrun \\\n  run\n"


def fake_slurm_tools(bin_dir, run_dir):
    """srun: a 'training' that checkpoints once asked (or exits 3 by itself); scontrol: records its calls."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/bin/bash
touch {run_dir}/started
for i in $(seq 30); do
  if [ -f {run_dir}/preempt.request ]; then echo '{{"step": 2}}' > {run_dir}/preempt.saved; exit 0; fi
  sleep 0.1
done
exit 3
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "$@" >> {run_dir}/scontrol.calls
[ "$1" = show ] && echo node1
true
""")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


@pytest.mark.parametrize("signalled", [True, False])
def test_batch_script_requeues_after_the_checkpoint(tmp_path, signalled):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempt.saved").write_text("stale\n")  # from an allocation that ended early: removed first
    fake_slurm_tools(tmp_path / "bin", run_dir)
    job = plan_jobs(["cluster=slurm", "cluster.gpus_per_node=0", f"run_dir={run_dir}"])[0]
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    proc = subprocess.Popen(["bash", "-c", render_sbatch(job)], env=env, stdout=subprocess.PIPE, text=True)
    while not (run_dir / "started").exists():
        time.sleep(0.05)
    if signalled:
        proc.send_signal(signal.SIGUSR1)  # what `scancel --batch --signal=USR1` delivers
    out, _ = proc.communicate(timeout=30)
    calls = (run_dir / "scontrol.calls").read_text().splitlines()
    assert calls == (["show hostnames node1", "requeue 42"] if signalled else ["show hostnames node1"])
    assert proc.returncode == (0 if signalled else 3), out
    assert not (run_dir / "preempt.request").exists() and not (run_dir / "preempt.saved").exists()


def test_multirun_over_two_layouts_gives_a_run_directory_each(synth_dir, tmp_path):
    sweep = tmp_path / "sweep"
    assert launch(["--multirun", "parallel=single,fsdp2", *job_overrides(synth_dir, steps=2), f"run_dir={sweep}"]) == 0
    for name, ranks in (("parallel=single", 1), ("parallel=fsdp2", 2)):
        run_dir = sweep / name
        assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"rank_{r}.log" for r in range(ranks)]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
