"""Every parallel layout against one process: same model, seed and samples, 3 optimizer steps.

All runs use a global batch of 8 samples in 2 micro-batches (grad accumulation, or pipeline micro-batches)
and a 4-layer decoder, so one single-process reference serves the whole matrix.

Tolerance (fp32): losses rtol 1e-5, gradient norms rtol 1e-4, parameters after 3 AdamW steps atol 1e-4.
Parallel runs add partial sums in other orders (reduce-scatter over ranks, row-parallel matmuls, the
vocabulary-parallel loss), so results agree to rounding (~1e-7 relative), not bit for bit; Adam's first
steps move each weight by about lr * sign(gradient), so an entry whose gradient is near zero can differ
by up to lr = 1e-3 times a fraction. A wrong layout (a dropped gradient scale, a missing tied-embedding
sync, a shifted context-parallel mask) misses these bounds by orders of magnitude.
"""

import pytest
import torch

from conftest import SMALL_MODEL, STEPS
from mmfm.config import load_config
from mmfm.train.trainer import Trainer
from parallel_runs import local_full_params, run_layout

GLOBAL_BATCH = 8
MODEL = [*SMALL_MODEL, "model.language.num_layers=4", "data.partitions=4"]  # the order of 1, 2 and 4 data ranks

LAYOUTS = {  # id: (world, data-parallel size, overrides)
    "fsdp2": (2, 2, ["parallel=fsdp2"]),
    "fsdp2+full-ac": (2, 2, ["parallel=fsdp2", "train.activation_checkpoint=full"]),
    "hsdp2x2": (4, 4, ["parallel=hsdp2x2"]),
    "tp2": (2, 1, ["parallel=tp2"]),
    "pp2-gpipe": (2, 1, ["parallel=pp2", "parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, 1, ["parallel=pp2", "parallel.pp_schedule=1f1b"]),
    "pp2-interleaved_1f1b": (2, 1, ["parallel=pp2", "parallel.pp_schedule=interleaved_1f1b",
                                    "parallel.pp_virtual_stages=2"]),
    "pp2-zero_bubble": (2, 1, ["parallel=pp2", "parallel.pp_schedule=zero_bubble", "parallel.pp_virtual_stages=2"]),
    "cp2": (2, 1, ["parallel=cp2"]),
    "fsdp2xtp2": (4, 2, ["parallel=fsdp2_tp2"]),
    "tp2xpp2": (4, 1, ["parallel=tp2_pp2", "parallel.pp_layers=[1,3]"]),
    "fsdp2xtp2xpp2": (8, 2, ["parallel=fsdp2_tp2_pp2"]),
}


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    trainer = Trainer(load_config([f"data.path={synth_dir}", *MODEL, *STEPS, f"data.batch_size={GLOBAL_BATCH // 2}"]),
                      tmp_path_factory.mktemp("single"))
    summary = trainer.fit()
    return {"losses": summary["losses"], "grad_norms": summary["grad_norms"], "val_loss": summary["val_loss"],
            "params": local_full_params(trainer)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, reference, synth_dir, tmp_path):
    world, dp, extra = LAYOUTS[layout]
    overrides = [f"data.path={synth_dir}", *MODEL, *STEPS, f"data.batch_size={GLOBAL_BATCH // 2 // dp}", *extra]
    got = run_layout(world, overrides, tmp_path)
    assert sorted(got["losses"]) == [1, 2, 3]
    for step, loss in reference["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(reference["grad_norms"][step], rel=1e-4), step
    assert got["losses"][3] < got["losses"][1]
    assert got["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)  # evaluated through the layout too
    assert got["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)


def test_checkpoint_moves_across_layouts_and_training_continues(synth_dir, tmp_path):
    """tp2 x pp2 (4 ranks) for 2 steps -> fsdp4 for 2 more -> one process for the last 2: the same losses and
    parameters as 6 uninterrupted steps in one process. (Constant learning rate after warm-up, so that
    each leg's max_steps does not change the schedule.)"""
    base = [f"data.path={synth_dir}", *MODEL, *STEPS, "train.schedule.min_lr_ratio=1.0"]
    legs = [("tp2_pp2", 4, 1, 2), ("fsdp4", 4, 4, 4), ("single", 1, 1, 6)]
    got, resume = {}, "never"
    for preset, world, dp, steps in legs:
        overrides = base + [f"parallel={preset}", f"data.batch_size={GLOBAL_BATCH // 2 // dp}",
                            f"train.max_steps={steps}", f"checkpoint.resume={resume}"]
        leg = run_layout(world, overrides, tmp_path / preset)
        got.update(leg["losses"])
        resume = str(tmp_path / preset / "run" / "checkpoints")
    straight = Trainer(load_config(base + ["train.max_steps=6", f"data.batch_size={GLOBAL_BATCH // 2}"]),
                       tmp_path / "straight")
    want = straight.fit()["losses"]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    for name, value in local_full_params(straight).items():
        torch.testing.assert_close(leg["params"][name], value, rtol=0, atol=1e-4, msg=name)
