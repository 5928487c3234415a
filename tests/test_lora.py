"""LoRA (model.lora, mmfm/models/lora.py): a fresh adapter changes nothing, only adapters train, checkpoints hold the
adapters and resume exactly, the merged export and PEFT's adapter folder give mmfm's logits in transformers / peft,
DPO's reference is the policy with its adapters disabled, and tp2 / fsdp2 equal one process."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import SMALL_MODEL, STEPS, one_line
from mmfm.checkpoint import CheckpointManager
from mmfm.checkpoint.hf import HFCheckpointError, export_language, language_model_from_hf
from mmfm.checkpoint.peft import export_peft
from mmfm.checkpoint.safe_read import read_metadata
from mmfm.config import load_config, validate
from mmfm.config.schema import LoRAConfig
from mmfm.data.synth import build_synth_dataset
from mmfm.data.synth_instruct import build_instruct_dataset
from mmfm.errors import ConfigError
from mmfm.models import build_model
from mmfm.models.init import parameter_seed
from mmfm.models.lora import adapters_disabled, apply_lora, init_adapter, is_adapter, lora_modules, merge_lora
from mmfm.parallel.parallelize import parallelize
from mmfm.train.trainer import Trainer, stage_checkpoint
from parallel_runs import local_full_params, run_layout

import peft  # noqa: E402  (the dev extra installs it: a missing one fails, never skips)

ATOL = 1e-4
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"]
SAME_ORDER = "data.partitions=2"  # one process reads the samples of 2 data-parallel ranks in their order
# SMALL_MODEL's language model (64 wide, 2 layers, 4 heads / 2 kv heads, SwiGLU 176, 64 positions, tied)
HF_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True)
HF = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}
TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Captions, conversations and preference pairs with one tokenizer (small: seconds)."""
    out = tmp_path_factory.mktemp("lora-data")
    build_synth_dataset(out / "synth", seed=0, train_size=200, val_size=20, shard_size=100, instruct_text=True,
                        progress=False)
    tokenizer = out / "synth" / "tokenizer.json"
    build_instruct_dataset(out / "sft", "sft", tokenizer, train_size=200, val_size=20, shard_size=100, max_turns=1,
                           progress=False)
    build_instruct_dataset(out / "pref", "preference", tokenizer, train_size=200, val_size=20, shard_size=100,
                           progress=False)
    return out


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """kind -> a tiny random transformers model of SMALL_MODEL's language shape, saved in fp32."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, (cls, config) in HF.items():
        torch.manual_seed(0)
        model = cls(config(**HF_SHAPE)).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def pretrained_run(data, tmp_path_factory):
    """Two full (non-LoRA) pretraining steps: the base that stage.init_from gives the LoRA runs."""
    run = tmp_path_factory.mktemp("pretrain")
    Trainer(load_config([f"data.path={data / 'synth'}", *SMALL_MODEL, *STEPS, "train.max_steps=2"]), run).fit()
    return run


def cfg_of(data_dir, *overrides):
    return load_config([f"data.path={data_dir}", *SMALL_MODEL, *STEPS, *overrides])


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def mmfm_logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm(lm.embed(TOKENS))


def init_adapters(model, seed: int = 0) -> None:
    """The adapters' layout-independent initialization (A Kaiming-uniform, B zero), as parallelize does it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                init_adapter(name, p, torch.Generator().manual_seed(parameter_seed(seed, name)))


def lora_language_model(folder, rslora=False):
    lm = language_model_from_hf(folder)
    apply_lora(lm, LoRAConfig(enabled=True, rank=4, alpha=8.0, rslora=rslora,
                              targets=["layers.*.attention.w[qkvo]", "layers.*.feed_forward.w[123]"]))
    init_adapters(lm)
    return lm


def init_from_weights(trainer, data_dir, run) -> dict[str, torch.Tensor]:
    """{name: parameter} of the full (non-LoRA) model in `run`'s checkpoint, built in the trainer's layout."""
    base = parallelize(cfg_of(data_dir / "sft"), trainer.dims, trainer.device).parts[0]
    CheckpointManager.load(stage_checkpoint(str(run)), base)
    return dict(base.named_parameters())


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("kind", list(HF))
def test_fresh_adapters_leave_the_base_logits_unchanged(kind, hf_folders):
    base = language_model_from_hf(hf_folders[kind])
    lm = lora_language_model(hf_folders[kind])
    assert sum(1 for n, _ in lm.named_parameters() if n.endswith("lora_B.weight")) == 2 * 7
    assert all(p.requires_grad == is_adapter(n) for n, p in lm.named_parameters())
    assert torch.equal(mmfm_logits(lm), mmfm_logits(base))  # B = 0: exactly the base
    reference = AutoModelForCausalLM.from_pretrained(hf_folders[kind]).eval()
    assert (mmfm_logits(lm) - hf_logits(reference)).abs().max() <= ATOL


@pytest.mark.parametrize("kind,rslora", [("llama", False), ("qwen2", True)])
def test_merged_and_peft_exports_give_mmfm_logits(kind, rslora, hf_folders, tmp_path):
    lm = lora_language_model(hf_folders[kind], rslora=rslora)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking adapters
        for name, p in lm.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ours = mmfm_logits(lm)
    with adapters_disabled(lm):
        assert (mmfm_logits(lm) - ours).abs().max() > 1e-2  # the adapters matter
    export_peft(lm, LoRAConfig(rank=4, alpha=8.0, rslora=rslora), tmp_path / "peft")
    names = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names and len(names) == 28
    base = AutoModelForCausalLM.from_pretrained(hf_folders[kind]).eval()
    with_adapters = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (hf_logits(with_adapters) - ours).abs().max() <= ATOL

    export_language(merge_lora(lm), tmp_path / "merged")
    assert not any(is_adapter(n) for n, _ in lm.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (hf_logits(merged) - ours).abs().max() <= ATOL


def test_export_of_unmerged_adapters_is_refused(hf_folders, tmp_path):
    one_line(HFCheckpointError, lambda: export_language(lora_language_model(hf_folders["llama"]), tmp_path / "x"),
             "LoRA adapters", "--merge-lora")


def test_bf16_base_equals_the_base_rounded_to_bf16(hf_folders):
    """model.lora.base_dtype=bf16: the adapted linears' weights in bf16 (half their bytes), the adapters and every
    other weight in fp32; logits in fp32 and under bf16 autocast, and the merged weights (fp32), equal those of an
    fp32-base LoRA model whose adapted weights were rounded to bf16, bitwise."""
    targets = ["layers.*.attention.w[qkvo]", "layers.*.feed_forward.w[123]"]
    lm, rounded = language_model_from_hf(hf_folders["llama"]), language_model_from_hf(hf_folders["llama"])
    apply_lora(lm, LoRAConfig(enabled=True, rank=4, alpha=8.0, targets=targets, base_dtype="bf16"))
    apply_lora(rounded, LoRAConfig(enabled=True, rank=4, alpha=8.0, targets=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (name, p), q in zip(lm.named_parameters(), rounded.parameters()):
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            q.copy_(p)  # a bf16 weight rounds nothing more: q holds its value in fp32
    adapted = {n for n, _ in lora_modules(lm)}
    assert len(adapted) == 2 * 7
    for name, p in lm.named_parameters():
        bf16 = name.endswith(".weight") and name[: -len(".weight")] in adapted
        assert p.dtype == (torch.bfloat16 if bf16 else torch.float32), name
    assert torch.equal(mmfm_logits(lm), mmfm_logits(rounded))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mmfm_logits(lm), mmfm_logits(rounded))
    for model in (lm, rounded):  # the backward through the widened weight: the adapters' gradients
        model(model.embed(TOKENS)).square().mean().backward()
    grads = {n: p.grad for n, p in rounded.named_parameters() if is_adapter(n)}
    for name, p in lm.named_parameters():
        if is_adapter(name):
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    merge_lora(lm), merge_lora(rounded)
    merged, expected = dict(lm.named_parameters()), dict(rounded.named_parameters())
    assert all(p.dtype == torch.float32 and torch.equal(p, expected[n]) for n, p in merged.items())


@pytest.mark.parametrize("override,fragment", [
    ("model.lora.rank=0", "model.lora.rank=0 must be > 0"),
    ("model.lora.rank=-2", "model.lora.rank=-2 must be > 0"),
    ("model.lora.alpha=0", "model.lora.alpha=0.0 must be > 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout=1.0 must lie in [0, 1)"),
    ("model.lora.targets=[language.layers.*.attention.wq,language.layers.*.mlp.up]",
     "pattern 'language.layers.*.mlp.up' matches no nn.Linear"),
    ("model.lora.targets=[]", "model.lora.targets is empty"),
    ("model.lora.base_dtype=fp16", "model.lora.base_dtype='fp16' is unknown"),
])
def test_bad_lora_config_is_one_line(override, fragment, data):
    one_line(ConfigError, lambda: validate(cfg_of(data / "sft", *LORA, override)), fragment)


# ---------------------------------------------------------------- training


def test_lora_trains_only_the_adapters_from_init_from(data, pretrained_run, tmp_path):
    """stage.init_from's full checkpoint fills the base; the adapters start fresh; only they change; the
    checkpoint holds them alone."""
    cfg = cfg_of(data / "sft", *LORA, "stage=sft", f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2",
                 "checkpoint.every=3")
    trainer = Trainer(cfg, tmp_path)
    assert trainer.reference is None
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    params = dict(trainer.model.named_parameters())
    assert optimized == {id(p) for n, p in params.items() if is_adapter(n)}
    trainer.resume()
    before = {n: p.detach().clone() for n, p in params.items()}
    for name, p in init_from_weights(trainer, data, pretrained_run).items():  # init_from's, not the seeded init
        assert torch.equal(before[name], p), name
    with torch.no_grad():
        assert all(torch.count_nonzero(p) == 0 for n, p in params.items() if n.endswith("lora_B.weight"))
    trainer.fit()
    for name, p in params.items():
        assert torch.equal(p, before[name]) == (not is_adapter(name)), name
    held = {k for k in read_metadata(tmp_path / "checkpoints" / "step_00000003").state_dict_metadata
            if k.startswith("model.")}
    assert held == {f"model.{n}" for n in params if is_adapter(n)}


def test_init_from_a_lora_run_is_refused_in_one_line(data, pretrained_run, tmp_path):
    from mmfm.checkpoint import CheckpointError

    lora_run = tmp_path / "lora"
    Trainer(cfg_of(data / "sft", *LORA, "stage=sft", f"stage.init_from={pretrained_run}", "train.max_steps=1"),
            lora_run).fit()
    one_line(CheckpointError, lambda: Trainer(cfg_of(data / "pref", *LORA, "stage=dpo", f"stage.init_from={lora_run}"),
                                              tmp_path / "dpo"), "is a LoRA run", "--merge-lora")


class StopsAt(Trainer):
    def train_step(self):
        if self.step + 1 == 3:
            raise KeyboardInterrupt
        return super().train_step()


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_lora_resume_is_bitwise_exact(base_dtype, data, pretrained_run, tmp_path):
    """2 steps, a checkpoint of the adapters, 2 more steps == 4 straight steps (the base reloaded from init_from;
    a bf16 base is init_from's fp32 weights rounded, and stays so)."""
    cfg = lambda: cfg_of(data / "sft", *LORA, "stage=sft", f"stage.init_from={pretrained_run}",  # noqa: E731
                         "train.max_steps=4", "checkpoint.every=2", "train.optim.lr=1e-2", "model.lora.dropout=0.1",
                         f"model.lora.base_dtype={base_dtype}")
    trainer = Trainer(cfg(), tmp_path / "straight")
    straight = trainer.fit()["losses"]
    full = init_from_weights(trainer, data, pretrained_run)
    adapted = {f"{n}.weight" for n, _ in lora_modules(trainer.model)}
    for name, p in trainer.model.named_parameters():
        if not is_adapter(name):
            assert torch.equal(p, full[name].to(p.dtype)), name
            assert (p.dtype == torch.bfloat16) == (base_dtype == "bf16" and name in adapted), name
    with pytest.raises(KeyboardInterrupt):
        StopsAt(cfg(), tmp_path / "stopped").fit()
    resumed = Trainer(cfg(), tmp_path / "stopped").fit()["losses"]
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)


class ExplicitReference(Trainer):
    """DPO against a separately built frozen base (LoRA off), as the non-LoRA trainer does it."""

    def build_reference(self):
        cfg = load_config([f"data.path={self.cfg.data.path}", *SMALL_MODEL, "stage=dpo",
                           f"stage.init_from={self.cfg.stage.init_from}"])
        parts = parallelize(cfg, self.dims, self.device, self.mesh)
        CheckpointManager.load(stage_checkpoint(cfg.stage.init_from), parts.parts)
        parts.train(False)
        parts.parts[0].requires_grad_(False)
        return parts.parts[0]


def test_dpo_with_lora_uses_the_base_as_reference(data, pretrained_run, tmp_path):
    overrides = [*LORA, "stage=dpo", "stage.preference.beta=0.5", f"stage.init_from={pretrained_run}",
                 "train.optim.lr=1e-2", "data.batch_size=4"]
    trainer = Trainer(cfg_of(data / "pref", *overrides), tmp_path / "lora")
    assert trainer.reference is None  # no second model
    lora = trainer.fit()
    explicit = ExplicitReference(cfg_of(data / "pref", *overrides), tmp_path / "explicit")
    assert explicit.reference is not None
    copy = explicit.fit()
    assert lora["losses"][1] == pytest.approx(0.6931, abs=1e-4)  # policy == reference: -log sigmoid(0)
    assert abs(lora["losses"][3] - lora["losses"][1]) > 1e-3
    for step, loss in copy["losses"].items():
        assert lora["losses"][step] == pytest.approx(loss, abs=1e-6), step
    assert lora["val_reward_margin"] == pytest.approx(copy["val_reward_margin"], abs=1e-6)


def test_grpo_with_lora_trains_the_adapters(data, pretrained_run, tmp_path):
    cfg = cfg_of(data / "sft", *LORA, "stage=grpo", f"stage.init_from={pretrained_run}", "train.max_steps=2",
                 "train.grad_accum_steps=1", "data.batch_size=2", "stage.grpo.group_size=2",
                 "stage.grpo.max_new_tokens=4", "train.optim.lr=1e-2", "stage.grpo.kl_coef=0.1")
    trainer = Trainer(cfg, tmp_path)
    assert trainer.reference is None and trainer.objective.needs_reference
    trainer.objective.reward = lambda answer, reference: float(len(answer) % 2)  # varied: non-zero advantages
    summary = trainer.fit()
    assert sorted(summary["losses"]) == [1, 2]
    assert any(torch.count_nonzero(p) > 0 for n, p in trainer.model.named_parameters() if n.endswith("lora_B.weight"))


# ---------------------------------------------------------------- export of a run


def test_export_of_a_lora_run_merged_and_as_peft(data, hf_folders, tmp_path, capsys):
    """A LoRA run on a Hugging Face base (model.pretrained.language): `mmfm export --merge-lora` and
    `--format peft` give the trained model's logits in transformers and peft."""
    from mmfm.cli.main import main

    run = tmp_path / "run"
    trainer = Trainer(cfg_of(data / "sft", *LORA, "stage=sft", f"model.pretrained.language={hf_folders['llama']}",
                             "train.optim.lr=1e-2", "checkpoint.every=3", "model.lora.rslora=true"), run)
    trainer.fit()
    lm = trainer.model.language
    ours = mmfm_logits(lm)
    with adapters_disabled(lm):
        assert (mmfm_logits(lm) - ours).abs().max() > 1e-4  # trained
        assert (mmfm_logits(lm) - hf_logits(AutoModelForCausalLM.from_pretrained(hf_folders["llama"]))).abs().max() <= ATOL

    with pytest.raises(SystemExit):
        main(["export", str(run), "--format", "hf", "--language-only", "--out", str(tmp_path / "x")])
    assert "add --merge-lora" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--language-only", "--merge-lora", "--out",
                 str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (hf_logits(merged) - ours).abs().max() <= ATOL
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == 4 and config["base_model_name_or_path"] == str(hf_folders["llama"])
    base = AutoModelForCausalLM.from_pretrained(hf_folders["llama"]).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (hf_logits(adapted) - ours).abs().max() <= ATOL


# ---------------------------------------------------------------- parallel layouts


@pytest.fixture(scope="module")
def one_process(data, pretrained_run, tmp_path_factory):
    cfg = cfg_of(data / "sft", *LORA, "stage=sft", f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2",
                 "data.batch_size=4", SAME_ORDER)
    trainer = Trainer(cfg, tmp_path_factory.mktemp("one"))
    return {**trainer.fit(), "params": local_full_params(trainer)}


def test_lora_with_activation_checkpointing_matches(one_process, data, pretrained_run, tmp_path):
    cfg = cfg_of(data / "sft", *LORA, "stage=sft", f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2",
                 "data.batch_size=4", "train.activation_checkpoint=full", SAME_ORDER)
    trainer = Trainer(cfg, tmp_path)
    got = {**trainer.fit(), "params": local_full_params(trainer)}
    for step, loss in one_process["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-6), step
    for name, value in one_process["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-6, msg=name)


def test_dpo_with_lora_under_fsdp2_matches_one_process(data, pretrained_run, tmp_path):
    """The reference forward (adapters disabled) runs through the same FSDP-sharded model, no second copy."""
    overrides = [f"data.path={data / 'pref'}", *SMALL_MODEL, *STEPS, *LORA, "stage=dpo", "stage.preference.beta=0.5",
                 f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2", SAME_ORDER]
    single = Trainer(load_config([*overrides, "data.batch_size=4"]), tmp_path / "one").fit()
    got = run_layout(2, [*overrides, "data.batch_size=2", "parallel=fsdp2"], tmp_path / "fsdp2")
    assert abs(single["losses"][3] - single["losses"][1]) > 1e-3
    for step, loss in single["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.parametrize("layout,world,dp", [("fsdp2", 2, 2), ("tp2", 2, 1)])
def test_lora_matches_one_process(layout, world, dp, one_process, data, pretrained_run, tmp_path):
    """3 steps of 2 micro-batches: losses within rel 1e-5, grad norms 1e-4, every parameter (adapters trained,
    base untouched) within 1e-4 = lr / 100: Adam moves an entry whose gradient is near zero by up to lr times a
    fraction, so rounding can show there (measured: 1.9e-5 on one lora_B entry, every other entry under 6e-6); a
    missing gradient reduction moves entries by ~lr."""
    overrides = [f"data.path={data / 'sft'}", *SMALL_MODEL, *STEPS, *LORA, "stage=sft",
                 f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2", f"data.batch_size={4 // dp}",
                 f"parallel={layout}", SAME_ORDER]
    got = run_layout(world, overrides, tmp_path)
    assert sorted(got["losses"]) == [1, 2, 3]
    for step, loss in one_process["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(one_process["grad_norms"][step], rel=1e-4), step
    assert set(got["params"]) == set(one_process["params"])
    for name, value in one_process["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)
    assert any(torch.count_nonzero(v) > 0 for n, v in got["params"].items() if n.endswith("lora_B.weight"))


def test_bf16_base_under_fsdp2_matches_one_process(data, pretrained_run, tmp_path):
    """FSDP2 units then hold bf16 base weights beside fp32 adapters (gathered together as bytes): losses within rel
    1e-5 and every parameter within 1e-5 of one process with the same bf16 base."""
    overrides = [f"data.path={data / 'sft'}", *SMALL_MODEL, *STEPS, *LORA, "stage=sft", "model.lora.base_dtype=bf16",
                 f"stage.init_from={pretrained_run}", "train.optim.lr=1e-2", SAME_ORDER]
    trainer = Trainer(load_config([*overrides, "data.batch_size=4"]), tmp_path / "one")
    single = {**trainer.fit(), "params": local_full_params(trainer)}
    got = run_layout(2, [*overrides, "data.batch_size=2", "parallel=fsdp2"], tmp_path / "fsdp2")
    for step, loss in single["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert {n for n, v in got["params"].items() if v.dtype == torch.bfloat16} == \
        {n for n, v in single["params"].items() if v.dtype == torch.bfloat16} != set()
    for name, value in single["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-5, msg=name)


def test_adapters_follow_the_tensor_parallel_base(data):
    """On a tp mesh (one gloo rank here; the tp2 test above runs two): column-parallel base -> A replicated, B split
    by rows; row-parallel base -> A split by columns, B replicated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    from mmfm.parallel.distributed import free_port
    from mmfm.parallel.tensor_parallel import apply_tensor_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = load_config([f"data.path={data / 'sft'}", *SMALL_MODEL]).model
        vlm = build_model(model, "meta")
        apply_tensor_parallel(vlm, init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)))
        apply_lora(vlm, LoRAConfig(enabled=True, rank=4))
        attention = vlm.language.layers["0"].attention
        assert attention.wq.weight.placements == (Shard(0),)
        assert attention.wq.lora_A.weight.placements == (Replicate(),)
        assert attention.wq.lora_B.weight.placements == (Shard(0),)
        assert attention.wo.weight.placements == (Shard(1),)
        assert attention.wo.lora_A.weight.placements == (Shard(1),)
        assert attention.wo.lora_B.weight.placements == (Replicate(),)
    finally:
        dist.destroy_process_group()


def test_memory_benchmark_counts_the_model_state_of_each_run():
    """`mmfm bench lora`'s exact figures, in this process (the benchmark runs each in a fresh one for its peaks):
    LoRA trains a few percent of the weights, its optimizer holds Adam's two fp32 moments of those alone, and its
    DPO builds no reference copy where full DPO holds one of every weight."""
    from mmfm.models.lora_bench import measure_run, lora_bench

    got = lora_bench(hidden=64, layers=2, rank=4, batch=2, steps=1, samples=8,
                     runs=("full-dpo", "lora-dpo", "lorabf16-dpo"), measure=measure_run)
    full, lora, bf16 = got["full-dpo"], got["lora-dpo"], got["lorabf16-dpo"]
    # model.lora.base_dtype=bf16: the adapted weights take 2 bytes instead of 4, the rest is the same
    assert lora["bf16_params"] == 0 < bf16["bf16_params"] < bf16["params"] - bf16["trainable"]
    assert lora["param_bytes"] - bf16["param_bytes"] == 2 * bf16["bf16_params"]
    assert {k: bf16[k] for k in ("params", "trainable", "optimizer_bytes", "reference_bytes")} == \
        {k: lora[k] for k in ("params", "trainable", "optimizer_bytes", "reference_bytes")}
    assert full["trainable"] == full["params"] and full["reference_bytes"] == full["param_bytes"]
    assert lora["reference_bytes"] == 0 and 0 < lora["trainable"] < 0.2 * full["trainable"]
    assert lora["params"] == full["params"] + lora["trainable"]  # the base, plus the adapters
    for r in (full, lora):
        assert r["grad_bytes"] == 4 * r["trainable"]
        assert 8 * r["trainable"] <= r["optimizer_bytes"] <= 8 * r["trainable"] + 8 * 1024  # + Adam's step counters
        assert r["peak"] > r["baseline"] > 0
