"""DPO under data and tensor parallelism (and DeepSpeed ZeRO-3) equals one process: the policy and its frozen reference are sharded the
same way, and losses, preference statistics, gradient norms and parameters match (same seed and pairs)."""

import pytest
import torch

from conftest import SMALL_MODEL, STEPS
from mmfm.config import load_config
from mmfm.train.trainer import Trainer
from parallel_runs import local_full_params, run_layout

PAIRS_PER_STEP = 8
DPO = ["stage=dpo", "stage.preference.beta=0.5", "train.optim.lr=1e-3", "data.partitions=2"]  # one order at dp 1, 2


@pytest.fixture(scope="module")
def initial_run(synth_dir, tmp_path_factory):
    """A few pretraining steps: the policy's starting point and the reference model."""
    run = tmp_path_factory.mktemp("pretrained")
    Trainer(load_config([f"data.path={synth_dir}", *SMALL_MODEL, *STEPS]), run).fit()
    return run


def dpo_overrides(preference_dir, initial_run, pairs_per_rank: int) -> list:
    return [f"data.path={preference_dir}", *SMALL_MODEL, *STEPS, *DPO, f"stage.init_from={initial_run}",
            f"data.batch_size={pairs_per_rank}"]


@pytest.fixture(scope="module")
def one_process(preference_dir, initial_run, tmp_path_factory):
    trainer = Trainer(load_config(dpo_overrides(preference_dir, initial_run, PAIRS_PER_STEP // 2)),
                      tmp_path_factory.mktemp("single"))
    summary = trainer.fit()
    return {**summary, "params": local_full_params(trainer)}


LAYOUTS = {"fsdp2": (2, 2, ["parallel=fsdp2"]), "tp2": (2, 1, ["parallel=tp2"]),
           "deepspeed-zero3": (2, 2, ["engine.name=deepspeed", "engine.deepspeed.zero_stage=3", "parallel.dp_shard=-1"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_matches_one_process(layout, one_process, preference_dir, initial_run, tmp_path):
    world, dp, extra = LAYOUTS[layout]
    overrides = dpo_overrides(preference_dir, initial_run, PAIRS_PER_STEP // 2 // dp) + extra
    got = run_layout(world, overrides, tmp_path)
    assert sorted(got["losses"]) == [1, 2, 3]
    assert one_process["losses"][1] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert abs(one_process["losses"][3] - one_process["losses"][1]) > 1e-3  # the policy moved off the reference
    for step, loss in one_process["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(one_process["grad_norms"][step], rel=1e-4), step
    assert got["val_loss"] == pytest.approx(one_process["val_loss"], rel=1e-5)
    for name, value in one_process["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)


def test_precomputed_reference_logps_train_like_the_reference_model(preference_dir, initial_run, one_process,
                                                                    tmp_path):
    """`mmfm data reference-logps` stores the reference model's log-probs with the pairs; DPO reading them
    matches DPO running the reference model."""
    from mmfm.cli.main import main

    stored = tmp_path / "preference-with-reference"
    assert main(["data", "reference-logps", str(preference_dir), "--checkpoint", str(initial_run), "--out",
                 str(stored), "--no-progress"]) == 0
    overrides = dpo_overrides(stored, initial_run, PAIRS_PER_STEP // 2) + ["stage.preference.reference=precomputed"]
    trainer = Trainer(load_config(overrides), tmp_path / "run")
    assert trainer.reference is None  # no second model
    summary = trainer.fit()
    for step, loss in one_process["losses"].items():
        assert summary["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert summary["val_reward_margin"] == pytest.approx(one_process["val_reward_margin"], rel=1e-4)


def test_init_from_a_run_with_another_tokenizer_is_refused(preference_dir, initial_run, tmp_path):
    from mmfm.checkpoint import CheckpointError
    from mmfm.data.synth import build_synth_dataset
    from mmfm.data.synth_instruct import build_instruct_dataset

    captions_only = tmp_path / "captions"  # its tokenizer learnt no instruction text: other ids
    build_synth_dataset(captions_only, train_size=20, val_size=10, progress=False)
    other = tmp_path / "other-tokenizer"
    build_instruct_dataset(other, "preference", captions_only / "tokenizer.json", train_size=40, val_size=10,
                           progress=False)
    precomputed = ["stage=dpo", "stage.preference.reference=precomputed", f"stage.init_from={initial_run}"]
    Trainer(load_config([f"data.path={preference_dir}", *SMALL_MODEL, *STEPS, *precomputed]), tmp_path / "ok").resume()
    with pytest.raises(CheckpointError, match="another tokenizer"):
        Trainer(load_config([f"data.path={other}", *SMALL_MODEL, *STEPS, *precomputed]), tmp_path / "refused")
