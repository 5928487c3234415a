import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SMALL_MODEL
from mmfm.config import ConfigError, load_config, validate
from mmfm.models import build_model
from mmfm.parallel.activation_checkpoint import apply_activation_checkpointing
from mmfm.train.trainer import Trainer

CONTAINERS = ("vision.blocks", "language.layers")


def loss_grads_and_saved(mode: str, every: int = 2):
    """Loss, parameter gradients and the number of tensors autograd kept for backward."""
    cfg = load_config(["model.language.num_layers=4", "model.vision.num_layers=2"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    wrapped = apply_activation_checkpointing(model, CONTAINERS, mode, every)
    torch.manual_seed(1)
    ids = torch.randint(4, 300, (2, 80))
    ids[:, 1:65] = 3
    images = torch.randn(2, 3, 64, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(ids, images).float().logsumexp(-1).mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()], sum(saved), wrapped


@pytest.mark.parametrize("mode,every,wrapped", [("full", 2, 6), ("selective", 2, 3)])
def test_checkpointing_recomputes_exactly_and_keeps_fewer_activations(mode, every, wrapped):
    loss, grads, saved, n = loss_grads_and_saved("none")
    ac_loss, ac_grads, ac_saved, ac_n = loss_grads_and_saved(mode, every)
    assert (n, ac_n) == (0, wrapped)
    assert ac_loss == loss
    assert all(torch.equal(a, b) for a, b in zip(grads, ac_grads))
    assert ac_saved < 0.7 * saved


class MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def test_op_mode_recomputes_only_cheap_ops_exactly():
    """`op` keeps the outputs of matrix multiplications: backward runs no more matmuls than without
    checkpointing, where `full` recomputes every forward matmul; results are bitwise the same."""
    counts, results = {}, {}
    for mode in ("none", "full", "op"):
        cfg = load_config(SMALL_MODEL).model
        model = build_model(cfg)
        apply_activation_checkpointing(model, CONTAINERS, mode)
        ids = torch.randint(4, 300, (2, 40), generator=torch.Generator().manual_seed(1))
        ids[0, 1:17] = 3  # one image of 16 patches in the first row
        loss = model(ids, torch.ones(1, 3, 64, 64)).float().logsumexp(-1).mean()
        with MatmulCounter() as counter:
            loss.backward()
        counts[mode], results[mode] = counter.calls, [p.grad for p in model.parameters()]
    assert counts["op"] == counts["none"] < counts["full"]
    assert all(torch.equal(a, b) for a, b in zip(results["none"], results["op"]))


def test_training_with_checkpointing_matches_and_checkpoints_keep_plain_names(synth_dir, tmp_path):
    base = [f"data.path={synth_dir}", "logger.wandb.enabled=false", "logger.progress_bar=false",
            "eval.num_samples=0", "train.val_every=0", "checkpoint.every=0", *SMALL_MODEL, "train.max_steps=2",
            "train.schedule.warmup_steps=1", "data.batch_size=8"]
    plain = Trainer(load_config(base), tmp_path / "plain").fit()["losses"]
    ac = Trainer(load_config(base + ["train.activation_checkpoint=full"]), tmp_path / "ac")
    assert ac.fit()["losses"] == plain
    # a checkpoint written with checkpointing loads into a model without it
    resumed = Trainer(load_config(base + ["train.max_steps=3", f"checkpoint.resume={tmp_path}/ac/checkpoints"]),
                      tmp_path / "resumed")
    assert sorted(resumed.fit()["losses"]) == [3]


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="train.activation_checkpoint='some' is unknown"):
        validate(load_config(["train.activation_checkpoint=some"]))


def test_compiled_blocks_train_like_eager(make_cfg, tmp_path):
    """train.compile compiles each block in place: same names, same losses. The aot_eager backend traces
    and differentiates the blocks as inductor does, without C++ code generation, to keep CI fast
    (inductor on CPU: same losses within 1e-7, measured)."""
    run = ["train.max_steps=3", "train.schedule.warmup_steps=1", "data.batch_size=4"]
    eager = Trainer(make_cfg(*run), tmp_path / "eager")
    compiled = Trainer(make_cfg(*run, "train.compile=true", "train.compile_backend=aot_eager"), tmp_path / "compiled")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.model.language.layers.values())
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    want, got = eager.fit()["losses"], compiled.fit()["losses"]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
