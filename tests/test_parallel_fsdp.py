"""FSDP2 checkpoints: exact resume at the same layout, and resume at another data-parallel size.
(The layouts' equivalence with one process is in test_parallel_equivalence.py.)"""

import pytest
import torch

from conftest import SMALL_MODEL, STEPS
from mmfm.config import load_config
from mmfm.train.trainer import Trainer
from parallel_runs import run_layout


def test_fsdp_resume_from_sharded_checkpoint_is_exact(synth_dir, tmp_path):
    base = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "parallel=fsdp2", "data.batch_size=4",
            "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=3"]
    straight = run_layout(2, base, tmp_path / "straight")
    resumed = run_layout(2, base + [f"checkpoint.resume={tmp_path}/straight/run/checkpoints/step_00000002"],
                           tmp_path / "resumed")
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(resumed["losses"][s] == straight["losses"][s] for s in (3, 4, 5))  # bitwise
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    # at another data-parallel size: model and optimizer reshard, the loader positions too
    one_process = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "train.max_steps=5", "data.batch_size=8",
                   f"checkpoint.resume={tmp_path}/straight/run/checkpoints/step_00000004"]
    summary = Trainer(load_config(one_process), tmp_path / "one").fit()
    assert summary["losses"][5] == pytest.approx(straight["losses"][5], rel=1e-5)


def test_fsdp_bf16_parameters_with_fp32_reduction_track_one_process(synth_dir, tmp_path):
    """train.precision=bf16 under FSDP2: parameters gathered and used in bf16, gradients reduced in fp32;
    against one bf16-autocast process, the losses agree to bf16 rounding (~3 significant digits)."""
    base = [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "train.precision=bf16", "data.partitions=2"]
    got = run_layout(2, base + ["parallel=fsdp2", "data.batch_size=4"], tmp_path / "fsdp")
    want = Trainer(load_config(base + ["data.batch_size=8"]), tmp_path / "one").fit()["losses"]
    for step, loss in want.items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-2)
    assert got["losses"][3] < got["losses"][1]
    assert all(v.dtype == torch.float32 for v in got["params"].values())  # fp32 master weights
