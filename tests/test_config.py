import subprocess
import sys

import pytest

from mmfm.config import ConfigError, load_config, validate
from mmfm.config.schema import JobConfig

BAD = [
    (["model.language.hidden_size=100", "model.language.num_heads=3"],
     "model.language.hidden_size=100 is not divisible by model.language.num_heads=3"),
    (["model.language.num_kv_heads=3"], "model.language.num_kv_heads=3 does not divide model.language.num_heads=4"),
    (["model.vision.image_size=60"], "model.vision.image_size=60 is not divisible by model.vision.patch_size=8"),
    (["model.vision.patch_size=6", "model.vision.image_size=48"], "model.vision.stem=conv needs a power-of-two"),
    (["model.vision.hidden_size=130"], "model.vision.hidden_size=130 is not divisible by model.vision.num_heads=4"),
    (["data.seq_len=60"], "data.seq_len=60 is too short for one image (64 image tokens"),
    (["data.seq_len=300"], "data.seq_len=300 exceeds model.language.max_seq_len=256"),
    (["model.name=gpt5"], "model.name='gpt5' is unknown; choose one of ['lm', 'vlm']"),
    (["train.precision=fp8"], "train.precision='fp8' is unknown"),
    (["train.max_steps=10", "train.schedule.warmup_steps=20"], "train.schedule.warmup_steps=20 must lie in [0"),
    (["train.optim.lr=0"], "train.optim.lr=0.0 must be > 0"),
    (["parallel.tp=3"], "model.language.num_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=2", "parallel.pp_schedule=zigzag"], "parallel.pp_schedule='zigzag' is unknown"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "set parallel.pp_virtual_stages>=2"),
    (["parallel.pp=2", "parallel.pp_layers=[1,1]"], "parallel.pp_layers=[1, 1] must list 2 stages"),
    (["parallel.pp=3", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=zero_bubble"], "6 stages exceed"),
    (["parallel.pp=2", "data.batch_size=3"], "data.batch_size=3 must split into parallel.pp_microbatches=2"),
    (["parallel.pp=2", "parallel.pp_microbatches=1"], "the pipeline gets 1 micro-batches per step"),
    (["parallel.cp=2", "parallel.tp=2"], "parallel.cp=2 together with tp or pp is not supported"),
    (["parallel.dp_shard=2"], "ask for 2 processes but this job has 1 (WORLD_SIZE); launch with `torchrun"),
    (["stage.objective=rlhf"], "stage.objective='rlhf' is unknown"),
    (["stage=dpo"], "set stage.init_from=<the SFT run directory>"),
    (["stage=dpo", "stage.preference.loss=kto", "stage.preference.reference=precomputed"],
     "stage.preference.loss='kto' is unknown"),
    (["stage=grpo", "stage.grpo.kl_coef=0", "stage.grpo.group_size=1"], "stage.grpo.group_size=1 must be >= 2"),
    (["stage=grpo", "stage.grpo.kl_coef=0", "stage.grpo.temperature=0"], "stage.grpo.temperature=0.0 must be > 0"),
    (["stage=grpo", "stage.grpo.kl_coef=0", "parallel=tp2"], "use parallel.tp=1"),
    (["stage=dpo", "stage.preference.reference=precomputed", "parallel=pp2"], "use parallel.pp=1"),
    (["stage=sft", "stage.freeze=[vision,projector,language]"], "leaves nothing to train"),
    (["stage=sft", "stage.freeze=[vit]"], "stage.freeze names ['vit']"),
    (["stage=sft", "stage.init_from=/no/such/run"], "stage.init_from=/no/such/run: no such run directory"),
    (["logger.wandb.mode=sometimes"], "logger.wandb.mode='sometimes' is unknown"),
    (["data.batch_size=0"], "data.batch_size=0 must be > 0"),
    (["parallel.tp=-1"], "parallel.tp=-1: only parallel.dp_shard or parallel.dp_replicate may be -1"),
    (["parallel.dp_shard=-1", "parallel.tp=2"],
     "parallel.dp_shard=-1 takes the rest of the world, but the world of 1 process(es) (one process: WORLD_SIZE is "
     "unset) does not divide by the other dims (tp=2 = 2)"),
    (["train.global_batch=64"], "train.global_batch=64 but data.batch_size=32 x train.grad_accum_steps=1 x 1 "
                                "data-parallel ranks (parallel.dp_replicate x dp_shard) = 32; change data.batch_size"),
    (["train.global_batch=-1"], "train.global_batch=-1 must be >= 0"),
]


def test_default_config_is_valid():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert validate(cfg) is cfg
    assert cfg.model.language.hidden_size % cfg.model.language.num_heads == 0


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1] for b in BAD])
def test_bad_config_names_field_and_fix(overrides, message):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_minus_one_on_one_process_is_that_process():
    cfg = validate(load_config(["parallel.dp_shard=-1", "train.global_batch=32"]))
    assert cfg.parallel.dp_shard == 1 and cfg.train.global_batch == 32


def test_type_error_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(["train.max_steps=many"])
    assert "train.max_steps" in str(err.value) and "\n" not in str(err.value)


def test_groups_and_experiment_compose():
    cfg = load_config(["experiment=demo", "model=vlm_7b"])
    assert cfg.experiment_name == "demo" and cfg.train.max_steps == 1400 and cfg.train.optim.lr == 2e-3
    assert cfg.model.language.hidden_size == 4096 and cfg.model.vision.patch_size == 14


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmfm.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cfg_job_prints_resolved_config(tmp_path):
    res = run_cli("train", "--cfg", "job", "model.language.num_layers=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "num_layers: 3" in res.stdout and "objective: pretrain" in res.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_config_fails_before_touching_data(tmp_path):
    res = run_cli("train", "model.language.num_kv_heads=3", "data.path=/nonexistent", f"run_dir={tmp_path}/run",
                  cwd=tmp_path)
    assert res.returncode == 2
    err_lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert err_lines == ["mmfm train: error: model.language.num_kv_heads=3 does not divide model.language.num_heads=4; "
                         "grouped-query attention needs num_heads % num_kv_heads == 0"]
    assert not (tmp_path / "run" / "checkpoints").exists()
