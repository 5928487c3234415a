"""The gpt family and the language-only model (model=gpt): a tiny forward on CPU, counts against the modules and the
published Megatron-LM GPT sizes, the planner's shares on the meta device, `mmfm plan` and `mmfm train` on it, and the
planner against the published runs (Narayanan et al. 2021, Table 1; mmfm.plan.published, docs/planning.md)."""

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from gpt_tp_runs import TINY, TP, gpt_run, tp_worker
from mmfm.config import ConfigError, load_config
from mmfm.models import build_model, model_spec
from mmfm.parallel import ParallelDims
from mmfm.parallel.distributed import free_port
from mmfm.plan.published import MEGATRON_GPT, paper_params, published_layouts, published_plans, predicted_tflops, \
    run_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_gpt_forward_gives_finite_logits_and_counts_equal_the_module():
    cfg = load_config(TINY).model
    model_spec(cfg).validate(cfg)
    model = build_model(cfg, "cpu", seed=0)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 16, 96) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert count(model) == model_spec(cfg).num_params(cfg)
    loss = model(ids, targets=ids)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(16 * 2 * torch.log(torch.tensor(96.0)).item(), rel=0.1)


def test_gpt_layers_have_layernorm_biases_learned_positions_gelu_mlp_and_a_shared_embedding():
    model = build_model(load_config(TINY).model, "meta")
    names = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert names["language.pos_embeddings.weight"] == (16, 32)
    assert names["language.layers.0.feed_forward.fc1.weight"] == (128, 32)  # 4 x hidden
    for bias in ("attention_norm", "attention.wq", "attention.wo", "ffn_norm", "feed_forward.fc1", "feed_forward.fc2"):
        assert f"language.layers.0.{bias}.bias" in names
    assert "language.norm.bias" in names and "language.output.weight" not in names  # tied
    assert model.language.output_weight() is model.language.tok_embeddings.weight


@pytest.mark.parametrize("override,message", [
    ("model.language.num_heads=5", r"^model.language.hidden_size=32 is not divisible by model.language.num_heads=5"),
    ("model.language.num_kv_heads=2", r"^model.language.num_kv_heads=2 differs from model.language.num_heads=4; "
                                      r"kind=gpt has no grouped-query attention"),
    ("model.language.qk_norm=true", r"^model.language.qk_norm=True / rope_scaling=none apply to the llama family"),
    ("model.language.max_seq_len=0", r"^model.language.max_seq_len=0 must be > 0"),
])
def test_gpt_layout_checks_are_one_line(override, message):
    cfg = load_config([*TINY, override]).model
    with pytest.raises(ConfigError, match=message) as err:
        model_spec(cfg).validate(cfg)
    assert "\n" not in str(err.value)


def test_tensor_parallel_must_divide_the_heads_the_mlp_and_the_vocabulary():
    cfg = load_config(TINY).model
    ParallelDims(tp=4).validate(cfg)
    with pytest.raises(ConfigError, match="^model.language.num_heads=4 is not divisible by parallel.tp=8"):
        ParallelDims(tp=8).validate(cfg)


@pytest.mark.parametrize("run", MEGATRON_GPT, ids=lambda r: f"{r.params_b:g}B")
def test_megatron_gpt_sizes_count_the_published_parameters(run):
    """The meta-device build and the counts hook agree, equal the paper's Eq. 2 plus the final LayerNorm (2h, which
    the formula leaves out), and give the printed count: to its one decimal, and within 0.5% where that decimal is
    finer than 0.5% (10B and up; 1.7 and 3.6 are 1.65 and 3.56 rounded)."""
    cfg = run_config(run).model
    counted = model_spec(cfg).num_params(cfg)
    assert count(build_model(cfg, "meta")) == counted == paper_params(run) + 2 * run.hidden
    assert round(counted / 1e9, 1) == run.params_b
    if run.params_b >= 10:
        assert counted == pytest.approx(run.params_b * 1e9, rel=0.005)


def test_planner_share_equals_the_meta_device_layout_for_gpt():
    from test_plan import meta_rank_numel, planner_rank_numel

    for layout, ranks in (({"tp": 2, "pp": 2}, [0, 3]), ({"dp_shard": 2}, [1])):
        cfg = load_config([*TINY, "data.seq_len=16", "train.precision=bf16"]
                          + [f"parallel.{k}={v}" for k, v in layout.items()])
        dims = ParallelDims.from_config(cfg.parallel)
        for rank in ranks:
            expected = planner_rank_numel(cfg, dims, rank)
            assert meta_rank_numel(cfg, dims, rank) == expected, (layout, rank)


def test_tensor_parallel_gpt_equals_one_process(tmp_path):
    """tp=2 against one process, fp32: the vocabulary-split embedding and logits, the Megatron-style blocks with their
    biases (split after column-parallel projections, replicated after row-parallel ones), the sequence-split
    LayerNorms and the replicated position embeddings give the same logits and gradients to rounding."""
    out = str(tmp_path / "tp.pt")
    mp.start_processes(tp_worker, args=(free_port(), out), nprocs=TP, join=True, start_method="spawn")
    want = gpt_run()
    scale = max(g.abs().max().item() for g in want["grads"].values())
    for rank in range(TP):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert (got["logits"] - want["logits"]).abs().max().item() <= 1e-5
        assert max((got["grads"][n] - g).abs().max().item() for n, g in want["grads"].items()) <= 1e-5 * scale


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mmfm.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_mmfm_plan_accepts_gpt_and_says_it_is_for_planning(tmp_path):
    res = run_cli("plan", "model=gpt", "hardware=a100_80gb", "devices=32", "global_batch=512", "seq_len=2048",
                  "--top", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("mmfm plan: gpt (1.65B parameters) on 32 x a100_80gb") and "layouts fit" in lines[0]
    assert lines[-1].startswith("planning only: model.name=lm (model.language.kind=gpt) is for planning")


def test_mmfm_train_refuses_gpt_in_one_line_before_writing_anything(tmp_path):
    res = run_cli("train", "model=gpt", f"run_dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 2
    assert [line for line in res.stderr.splitlines() if line.strip()] == [
        "mmfm train: error: model.name=lm (model.language.kind=gpt) is for planning and meta-device builds (mmfm plan, "
        "build_model(cfg.model, 'meta')): mmfm train trains vision-language models only; choose a model.name=vlm "
        "preset such as model=tiny_vlm"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("run", MEGATRON_GPT, ids=lambda r: f"{r.params_b:g}B")
def test_published_layout_fits_and_its_predicted_throughput_is_within_25_percent(run):
    """The published (tp, pp, dp) with full recomputation is among the planner's candidates and fits; the fastest
    such plan's TFLOP/s per GPU (counted as the paper counts, Eq. 3) lies within 25% of the published figure."""
    assert published_layouts(run_config(run), run), "the planner does not enumerate the published layout"
    plans = published_plans(run)
    assert plans, "the published layout does not fit"
    assert predicted_tflops(run, plans[0]) == pytest.approx(run.tflops, rel=0.25)
