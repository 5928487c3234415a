"""engine.name=deepspeed: ZeRO stages against the native engine in one process, checkpoints across engines, the loss
guard, and the config's one-line errors (docs/engines.md).

All runs: the small 4-layer model, 8 samples per step in 2 micro-batches (gradient accumulation 2), 3 AdamW steps,
fp32 on CPU. Tolerances as tests/test_parallel_equivalence.py: losses rtol 1e-5, gradient norms rtol 1e-4, parameters
atol 1e-4 (ZeRO reduces gradients in another order; Adam's first steps move a weight by about lr = 1e-3).
"""

import dataclasses
import json
import math
import os
import re

import pytest
import torch

from conftest import SMALL_MODEL, STEPS
from mmfm.config import load_config
from mmfm.config.validate import preflight
from mmfm.errors import ConfigError
from mmfm.train.deepspeed_engine import deepspeed_config
from mmfm.train.trainer import Trainer
from parallel_runs import local_full_params, run_layout

GLOBAL_BATCH = 8
MODEL = [*SMALL_MODEL, "model.language.num_layers=4", "data.partitions=4"]
DS = ["engine.name=deepspeed"]

ENGINES = {  # id: (processes, overrides, what the engine reports)
    "zero1": (2, ["engine.deepspeed.zero_stage=1"], "ZeRO-1 (DeepSpeedZeroOptimizer)"),
    "zero2": (2, ["engine.deepspeed.zero_stage=2"], "ZeRO-2 (DeepSpeedZeroOptimizer)"),
    "zero3": (2, ["engine.deepspeed.zero_stage=3"], "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3)"),
    "zero3+offload": (2, ["engine.deepspeed.zero_stage=3", "engine.deepspeed.offload_optimizer=cpu",
                          "engine.deepspeed.offload_param=cpu"],
                      "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3), optimizer offload cpu, parameter offload cpu"),
    "zero2+cpu_adam": (2, ["engine.deepspeed.zero_stage=2", "engine.deepspeed.offload_optimizer=cpu",
                           "engine.deepspeed.cpu_adam=true"],
                       "ZeRO-2 (DeepSpeedZeroOptimizer), optimizer offload cpu, DeepSpeedCPUAdam"),
}


def base(synth_dir, world: int = 1) -> list:
    return [f"data.path={synth_dir}", *MODEL, *STEPS, f"data.batch_size={GLOBAL_BATCH // 2 // world}"]


@pytest.fixture(scope="module")
def native(synth_dir, tmp_path_factory):
    trainer = Trainer(load_config(base(synth_dir)), tmp_path_factory.mktemp("native"))
    summary = trainer.fit()
    return {"losses": summary["losses"], "grad_norms": summary["grad_norms"], "val_loss": summary["val_loss"],
            "params": local_full_params(trainer)}


def assert_matches(got: dict, want: dict) -> None:
    assert sorted(got["losses"]) == sorted(want["losses"])
    for step, loss in want["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(want["grad_norms"][step], rel=1e-4), step
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)  # validated through the engine too
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_zero_stage_matches_the_native_engine(engine, native, synth_dir, tmp_path):
    world, extra, runs = ENGINES[engine]
    got = run_layout(world, [*base(synth_dir, world), "parallel.dp_shard=-1", *DS, *extra], tmp_path)
    assert got["engine"] == runs
    assert_matches(got, native)
    assert got["losses"][3] < got["losses"][1]


def test_a_run_moves_between_engines_through_its_checkpoints(synth_dir, tmp_path):
    """native (1 process) steps 1-2 -> ZeRO-3 on 2 processes steps 3-4 -> ZeRO-1 in one process, its optimizer
    offloaded and stepped by CPUAdam, steps 5-6 -> native steps 7-8, each leg resuming the one before from its checkpoint: the losses and final weights equal 8
    uninterrupted native steps (rel 1e-5, atol 1e-4). (A constant learning rate after warm-up, so that each leg's
    max_steps leaves the schedule as it is.)"""
    common = [*MODEL, *STEPS, f"data.path={synth_dir}", "train.schedule.min_lr_ratio=1.0"]
    straight = Trainer(load_config([*common, "train.max_steps=8", f"data.batch_size={GLOBAL_BATCH // 2}"]),
                       tmp_path / "straight")
    want = straight.fit()["losses"]
    legs = [("native1", 1, []), ("zero3", 2, [*DS, "parallel.dp_shard=-1", "engine.deepspeed.zero_stage=3"]),
            ("zero1", 1, [*DS, "engine.deepspeed.zero_stage=1", "engine.deepspeed.offload_optimizer=cpu",
                          "engine.deepspeed.cpu_adam=true"]), ("native2", 1, [])]
    got, resume = {}, "never"
    for i, (name, world, extra) in enumerate(legs):
        leg = run_layout(world, [*common, f"data.batch_size={GLOBAL_BATCH // 2 // world}",
                                 f"train.max_steps={2 * (i + 1)}", f"checkpoint.resume={resume}", *extra],
                         tmp_path / name)
        got.update(leg["losses"])
        resume = str(tmp_path / name / "run" / "checkpoints")
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    for name, value in local_full_params(straight).items():
        torch.testing.assert_close(leg["params"][name], value, rtol=0, atol=1e-4, msg=name)


ZERO2_4_STEPS = ["parallel.dp_shard=-1", *DS, "engine.deepspeed.zero_stage=2", "train.max_steps=4"]


@pytest.fixture(scope="module")
def zero2_run(synth_dir, tmp_path_factory):
    """ZeRO-2 on 2 processes, 4 steps (the learning rate warming up, then decaying), a checkpoint at step 2: its
    results and that checkpoint."""
    folder = tmp_path_factory.mktemp("zero2")
    whole = run_layout(2, [*base(synth_dir, 2), *ZERO2_4_STEPS, "checkpoint.every=2"], folder)
    return whole, folder / "run/checkpoints/step_00000002"


def test_a_deepspeed_run_resumes_bit_for_bit(zero2_run, synth_dir, tmp_path):
    """A run resumed from the ZeRO-2 run's step 2 gives steps 3 and 4 the same losses and weights to the last bit
    (fp32 on CPU)."""
    whole, step2 = zero2_run
    rest = run_layout(2, [*base(synth_dir, 2), *ZERO2_4_STEPS, f"checkpoint.resume={step2}"], tmp_path / "rest")
    assert sorted(rest["losses"]) == [3, 4]
    assert rest["losses"] == {s: whole["losses"][s] for s in (3, 4)}
    for name, value in whole["params"].items():
        assert torch.equal(rest["params"][name], value), name


def checkpoint_tensors(folder) -> dict:
    """Every entry of an mmfm checkpoint (model, optimizer, RNG), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, folder.parent / "whole.pt")
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", torch.load(folder.parent / "whole.pt", weights_only=True))
    return flat


@pytest.mark.parametrize("stage", [2, 3])
def test_a_checkpoint_converts_to_deepspeed_s_format_and_back_exactly(stage, zero2_run, tmp_path):
    """`mmfm convert --to deepspeed` on 2 processes (DeepSpeed's own save_checkpoint writes the ZeRO partitions),
    then `--to dcp` (DeepSpeed's load_checkpoint reads them): every weight, AdamW moment, step, learning rate, the RNG
    and the trainer state (schedule, data position) come back bit for bit."""
    from parallel_runs import run_cli

    _, step2 = zero2_run
    run_cli(2, ["convert", step2, "--to", "deepspeed", "--zero-stage", stage, "--out", tmp_path / "ds"])
    files = sorted(p.name for p in (tmp_path / "ds/step_00000002").iterdir())
    model_files = ["mp_rank_00_model_states.pt"] if stage < 3 else [
        f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    assert files == sorted([*model_files, *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))])
    assert (tmp_path / "ds/latest").read_text().strip() == "step_00000002"
    run_cli(2, ["convert", tmp_path / "ds", "--to", "dcp", "--out", tmp_path / "back"])
    back = tmp_path / "back/checkpoints/step_00000002"
    assert json.loads((back / "trainer_state.json").read_text()) == json.loads((step2 / "trainer_state.json").read_text())
    want, got = checkpoint_tensors(step2), checkpoint_tensors(back)
    assert got.keys() == want.keys() and any(".exp_avg_sq" in k for k in want)
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key


def test_deepspeed_to_dcp_then_native_resumes_as_deepspeed_would(zero2_run, synth_dir, tmp_path, capsys):
    """The ZeRO-2 run's step 2 through DeepSpeed's format (2 processes) and back, resumed by the native engine in one
    process: steps 3 and 4 as the run that stayed on DeepSpeed (losses rel 1e-5, weights atol 1e-4). Converting the
    2-partition checkpoint back in one process is refused in one line."""
    from parallel_runs import run_cli

    from mmfm.cli.main import main

    whole, step2 = zero2_run
    run_cli(2, ["convert", step2, "--to", "deepspeed", "--out", tmp_path / "ds"])
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "ds"), "--to", "dcp", "--out", str(tmp_path / "one")])
    assert re.search(r"was written by 2 DeepSpeed ranks, .* run the conversion on 2 processes \(torchrun "
                     r"--nproc-per-node 2 .*\), here 1$", capsys.readouterr().err.strip())
    run_cli(2, ["convert", tmp_path / "ds", "--to", "dcp", "--out", tmp_path / "back"])
    trainer = Trainer(load_config([*base(synth_dir), "train.max_steps=4", "checkpoint.resume=auto"]),
                      tmp_path / "back")
    losses = trainer.fit()["losses"]
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(whole["losses"][step], rel=1e-5), step
    for name, value in local_full_params(trainer).items():
        torch.testing.assert_close(value, whole["params"][name], rtol=0, atol=1e-4, msg=name)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


@pytest.mark.parametrize("damage, message", [
    ("pickle", r"mp_rank_00_model_states.pt pickles (posix|os).system, which is neither tensor data nor DeepSpeed "
               r"checkpoint state, so mmfm does not unpickle it"),
    ("latest", r"latest names '../..', which is not a checkpoint folder inside"),
    ("not deepspeed", r"is not a DeepSpeed checkpoint \(no `latest` file, no \*_model_states.pt\)"),
])
def test_a_hostile_deepspeed_checkpoint_is_refused_in_one_line(damage, message, tmp_path, monkeypatch, capsys):
    """Refused before DeepSpeed or torch unpickles anything: no code runs, nothing is written."""
    from mmfm.cli.main import main

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "ds"
    (source / "t").mkdir(parents=True)
    (source / "latest").write_text("../.." if damage == "latest" else "t")
    if damage == "pickle":
        torch.save({"module": {}, "payload": RunsCode()}, source / "t/mp_rank_00_model_states.pt")
    if damage == "not deepspeed":
        (source / "latest").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(source), "--to", "dcp", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err, err
    assert not (tmp_path / "ran-code").exists() and not (tmp_path / "out").exists()


def test_a_nan_batch_skips_its_update_under_deepspeed(synth_dir, tmp_path):
    """The loss guard under ZeRO-3: the poisoned step's update is dropped (weights and AdamW state as before it), the
    next steps train on."""
    trainer = Trainer(load_config([*base(synth_dir), *DS, "engine.deepspeed.zero_stage=3", "train.max_steps=4"]),
                      tmp_path / "run")
    weights, loader = {}, trainer.loader

    class Poisoned:
        def __iter__(self):
            return self

        def __next__(self):
            step = trainer.step + 1
            weights.setdefault(step, {n: trainer.engine.full_weight(p).clone()
                                      for n, p in trainer.engine.module.named_parameters()})
            batch = next(loader)
            if step == 2:
                batch = dataclasses.replace(batch, pixel_values=torch.full_like(batch.pixel_values, float("nan")))
            return batch

        def state_dict(self):
            return loader.state_dict()

    trainer.loader = Poisoned()
    losses = trainer.fit()["losses"]
    assert math.isnan(losses[2]) and all(math.isfinite(losses[s]) for s in (1, 3, 4)), losses
    for name, value in weights[2].items():
        assert torch.equal(weights[3][name], value), name
        assert not torch.equal(weights[2][name], weights[1][name]) or "bias" in name or "norm" in name, name
    assert losses[4] < losses[1]
    # the one-rank process group mmfm started for DeepSpeed is gone with its LOCAL_RANK (later code, e.g. lmms-eval's
    # accelerate, would take this process for a torchrun rank)
    assert not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ


def ds_config_of(*overrides: str, world: int = 2) -> dict:
    return deepspeed_config(load_config([*DS, *overrides]), world)


def test_the_deepspeed_config_is_mmfm_s_with_the_user_json_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5,
                                "zero_optimization": {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000,
                                                      "offload_optimizer": {"device": "cpu", "pin_memory": False}}}))
    got = ds_config_of(f"engine.deepspeed.config={user}", "data.batch_size=4", "train.grad_accum_steps=2",
                       "train.grad_clip=0.5")
    assert got["train_micro_batch_size_per_gpu"] == 4 and got["gradient_accumulation_steps"] == 2
    assert got["train_batch_size"] == 16 and got["gradient_clipping"] == 0.5 and got["bf16"] == {"enabled": False}
    assert got["zero_optimization"] == {"stage": 3, "overlap_comm": True, "reduce_bucket_size": 1000,
                                        "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds_config_of()["zero_optimization"] == {"stage": 2}  # without a JSON: stage 2, nothing offloaded
    nvme = ds_config_of("engine.deepspeed.zero_stage=3", "engine.deepspeed.offload_param=nvme",
                        "engine.deepspeed.nvme_path=/scratch/swap")
    assert nvme["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/scratch/swap"}


@pytest.mark.parametrize("json_doc, overrides, message", [
    ({"train_micro_batch_size_per_gpu": 8}, ["data.batch_size=4"],
     r"sets train_micro_batch_size_per_gpu=8 but data.batch_size gives 4; remove the key"),
    ({"gradient_clipping": 2.0}, [], r"sets gradient_clipping=2.0 but train.grad_clip gives 1.0"),
    ({"bf16": {"enabled": True}}, [], r"sets bf16.enabled=true but train.precision gives false"),
    ({"fp16": {"enabled": True}}, [], r"enables fp16, which mmfm does not train in; .* train.precision=bf16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, [],
     r"has a \"optimizer\" block, but the optimizer and its schedule are mmfm's \(train.optim.\*\)"),
    ({"zero_optimization": {"stage": 3}}, ["engine.deepspeed.zero_stage=2"],
     r"sets zero_optimization.stage=3 but engine.deepspeed.zero_stage gives 2"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, [],
     r"offload_param=cpu needs ZeRO stage 3 \(zero_stage=2\)"),
    ([1, 2], [], r"holds a JSON list, not an object"),
])
def test_a_conflicting_deepspeed_json_is_one_line(json_doc, overrides, message, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(json_doc))
    with pytest.raises(ConfigError, match=message) as err:
        ds_config_of(f"engine.deepspeed.config={user}", *overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["parallel=tp2"], r"^engine.name=deepspeed runs data parallelism \(ZeRO\) only, not parallel.tp=2; set them to 1"),
    (["parallel=pp2"], r"not parallel.pp=2"),
    (["model.lora.enabled=true"], r"does not run model.lora.enabled=true yet; use engine.name=native"),
    (["engine.deepspeed.zero_stage=4"], r"zero_stage=4 is not a ZeRO stage mmfm runs; use 1, 2 or 3"),
    (["engine.deepspeed.zero_stage=0"], r"zero_stage=0 is not a ZeRO stage mmfm runs; .* engine.name=native\)$"),
    (["engine.deepspeed.offload_param=nvme", "engine.deepspeed.zero_stage=3"], r"offload_param=nvme needs "
     r"engine.deepspeed.nvme_path"),
    (["engine.deepspeed.offload_optimizer=disk"], r"offload_optimizer='disk' is unknown"),
    (["engine.deepspeed.cpu_adam=true"], r"cpu_adam=true steps optimizer state offloaded to the host; set "
     r"engine.deepspeed.offload_optimizer=cpu \(or nvme\)"),
    (["engine.deepspeed.config=/nonexistent/ds.json"], r"cannot be read"),
    (["engine.name=megatron"], r"engine.name='megatron' is unknown; use native or deepspeed"),
    (["parallel=auto"], r"parallel=auto plans the native engine's layouts; .* use parallel.dp_shard=-1"),
])
def test_bad_engine_config_is_one_line_before_any_work(overrides, message, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config([*DS, "parallel.dp_shard=2", *overrides, f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=message) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_sft_under_zero2_matches_the_native_engine(sft_dir, tmp_path):
    """The SFT stage (answer tokens only, chat data) through ZeRO-2 on 2 processes equals the native engine in one."""
    common = [f"data.path={sft_dir}", *MODEL, *STEPS, "stage=sft", "data.seq_len=64"]  # no sample skipped
    trainer = Trainer(load_config([*common, f"data.batch_size={GLOBAL_BATCH // 2}"]), tmp_path / "native")
    want = {**trainer.fit(), "params": local_full_params(trainer)}
    got = run_layout(2, [*common, f"data.batch_size={GLOBAL_BATCH // 4}", "parallel.dp_shard=-1", *DS,
                         "engine.deepspeed.zero_stage=2"], tmp_path / "zero2")
    assert_matches(got, want)
    assert got["losses"][3] < got["losses"][1]


def test_an_old_deepspeed_is_refused_in_one_line(monkeypatch, tmp_path):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.18.0")
    with pytest.raises(ConfigError, match=r"^engine.name=deepspeed: DeepSpeed 0.18.0 is installed, older than "
                                          r"0.19.4; `pip install --no-build-isolation .*; or use engine.name=native$"):
        preflight(load_config([*DS, f"run_dir={tmp_path / 'run'}"]))
