"""The mixture-of-experts layer (mmfm.models.moe) against hand-written references: routing, dropless and capacity
dispatch, the balancing losses and bias, and the model and config around it."""

import concurrent.futures
import dataclasses
import json
import multiprocessing

import pytest
import torch

from mmfm.config import ConfigError, load_config, validate
from mmfm.config.schema import LanguageConfig, MoEConfig
from mmfm.models import build_model, model_spec
from mmfm.models.moe import MoE, Router, load_balancing_loss, z_loss
from mmfm.train.trainer import Trainer

DIM, HIDDEN = 16, 24


def make_moe(seed: int = 0, **options) -> MoE:
    moe = MoE(DIM, MoEConfig(**{"num_experts": 8, "top_k": 2, **options}), HIDDEN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def tokens(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def reference_route(router: Router, x: torch.Tensor):
    """Per token, by hand: scores, the k best (biased, group-limited) experts, their weights."""
    moe = router.moe
    out_w, out_e = [], []
    for row in x:
        logits = row @ router.gate.weight.T
        scores = logits.softmax(-1) if moe.score_func == "softmax" else logits.sigmoid()
        choice = (scores + router.expert_bias).tolist()
        per_group = moe.num_experts // moe.num_groups
        if moe.num_groups > 1:
            group_score = [sum(sorted(choice[g * per_group:(g + 1) * per_group])[-2:]) for g in range(moe.num_groups)]
            best = sorted(range(moe.num_groups), key=lambda g: -group_score[g])[:moe.topk_groups]
            choice = [c if e // per_group in best else float("-inf") for e, c in enumerate(choice)]
        chosen = sorted(range(moe.num_experts), key=lambda e: -choice[e])[:moe.top_k]
        w = scores[chosen]
        if moe.normalize_weights:
            w = w / w.sum()
        out_w.append(w * moe.route_scale)
        out_e.append(chosen)
    return torch.stack(out_w), torch.tensor(out_e)


@pytest.mark.parametrize("options", [
    {},
    {"score_func": "sigmoid", "route_scale": 2.5},
    {"score_func": "sigmoid", "num_groups": 4, "topk_groups": 2, "bias_update_rate": 1e-3},
    {"normalize_weights": False, "top_k": 3},
])
def test_router_picks_the_top_k_experts_with_their_weights(options):
    moe = make_moe(**options)
    if options.get("bias_update_rate"):
        moe.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))  # the bias changes the choice, not the weights
    x = tokens()
    weights, experts, _, _ = moe.router(x)
    want_w, want_e = reference_route(moe.router, x)
    assert torch.equal(experts.sort(-1).values, want_e.sort(-1).values)
    order = experts.argsort(-1)
    torch.testing.assert_close(weights.gather(-1, order), want_w.gather(-1, want_e.argsort(-1)), rtol=1e-5, atol=1e-6)


def expert_output(moe: MoE, row: torch.Tensor, e: int) -> torch.Tensor:
    w = moe.experts
    return (torch.nn.functional.silu(row @ w.w1[e]) * (row @ w.w3[e])) @ w.w2[e]


@pytest.mark.parametrize("shared", [0, 1])
def test_dropless_dispatch_equals_each_tokens_experts_computed_densely(shared):
    moe = make_moe(num_shared_experts=shared)
    x = tokens(64)
    out = moe(x.view(4, 16, DIM)).view(64, DIM)
    weights, experts, _, _ = moe.router(x)
    for i, row in enumerate(x):
        want = sum(weights[i, j] * expert_output(moe, row, int(experts[i, j])) for j in range(2))
        if shared:
            want = want + moe.shared(row)
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    assert moe.stats["dropped"] == 0


def test_expert_parallel_checkpoint_resumes_on_one_process(synth_dir, tmp_path):
    """An ep2 x fsdp2 run's checkpoint (experts as DTensors split over ep, then FSDP) resumed on one process: the
    weights, AdamW state and balancing bias reshard, and step 3 matches the 4-process run's (rel 1e-5)."""
    from parallel_runs import run_layout

    base = [*expert_base(synth_dir), "model.language.moe.bias_update_rate=0.01", "checkpoint.every=2"]
    straight = run_layout(4, [*base, "data.batch_size=1", "parallel.dp_shard=4", "parallel.ep=2"], tmp_path / "ep")
    resumed = Trainer(load_config([*base, "data.batch_size=4",
                                   f"checkpoint.resume={tmp_path}/ep/run/checkpoints/step_00000002"]),
                      tmp_path / "one").fit()
    assert sorted(resumed["losses"]) == [3]
    assert resumed["losses"][3] == pytest.approx(straight["losses"][3], rel=1e-5)


def grouped_mm_experts(seed: int = 0):
    from mmfm.kernels.apply import apply_kernels

    moe = make_moe(seed)
    assert apply_kernels(moe, {**TORCH_KERNELS, "experts": "grouped_mm"})["experts"] == 1
    return moe.experts


TORCH_KERNELS = {"rms_norm": "torch", "rotary": "torch", "swiglu": "torch", "linear_cross_entropy": "torch",
                 "attention": "sdpa"}


def test_grouped_mm_experts_equal_one_matmul_per_expert():
    """kernels.experts=grouped_mm (torch._grouped_mm, three calls for all experts) against the loop, on 40 rows over
    8 experts of which two get none: output and every gradient, fp32 rtol 1e-6; bf16 within its rounding."""
    loop, grouped = make_moe(3).experts, grouped_mm_experts(3)
    counts = torch.tensor([6, 0, 9, 3, 0, 12, 4, 6])
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(4))
    outs = []
    for experts in (loop, grouped):
        xi = x.clone().requires_grad_()
        out = experts(xi, counts)
        out.pow(2).sum().backward()
        outs.append((out.detach(), xi.grad, *(w.grad for w in (experts.w1, experts.w3, experts.w2))))
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert outs[0][0].abs().max() > 0.1 and not outs[0][2][1].any()  # expert 1 got no rows: a zero gradient
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        half = grouped(x.bfloat16(), counts)
    torch.testing.assert_close(half.float(), outs[0][0], rtol=0.05, atol=0.05)


def test_auto_picks_grouped_mm_where_it_runs_and_refuses_unknown_backends():
    from mmfm.kernels.apply import resolve_kernels

    assert resolve_kernels(load_config([]).kernels, torch.device("cpu"))["experts"] == "grouped_mm"
    assert resolve_kernels(load_config(["kernels=torch"]).kernels, torch.device("cpu"))["experts"] == "loop"
    with pytest.raises(ConfigError, match=r"kernels.experts='fast' is unknown; use one of"):
        validate(load_config(["kernels.experts=fast"]))


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_experts_without_rows_keep_the_output_in_the_autograd_graph(kernel):
    """No expert got a row (an expert-parallel rank that received no tokens): the empty output still descends from
    x, so that backward reaches the all-to-all before it, which the rank's peers wait in."""
    experts = make_moe().experts if kernel == "loop" else grouped_mm_experts()
    x = torch.zeros(0, experts.w1.shape[1], requires_grad=True)
    out = experts(x, torch.zeros(experts.w1.shape[0], dtype=torch.long))
    assert out.shape == (0, experts.w2.shape[-1]) and out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert experts.w1.grad is not None and not experts.w1.grad.any()


def test_expert_parallel_layer_equals_one_process_and_sends_the_counted_bytes(tmp_path):
    """2 gloo processes, each holding 4 of the 8 experts, each routing its own 40 tokens: output and input gradient
    equal the whole layer's on one process, and each rank's all-to-all bytes equal ep_expected_bytes for the rows
    it routed (40 x 2) and the rows routed to its experts by both ranks (counted here from the router)."""
    import functools

    import torch.multiprocessing as mp
    from expert_runs import worker
    from mmfm.parallel.comm import ep_expected_bytes
    from mmfm.parallel.distributed import free_port

    inputs = [tokens(seed=1), tokens(seed=2) * 3]  # rank 1's tokens lean elsewhere: uneven splits
    mp.spawn(worker, args=(2, free_port(), functools.partial(make_moe, 0), inputs, str(tmp_path)), nprocs=2)
    layer = make_moe(0)
    for rank, x in enumerate(inputs):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        x = x.clone().requires_grad_(True)
        want = layer(x)
        want.square().sum().backward()
        torch.testing.assert_close(got["out"], want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad"], x.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            chosen = torch.cat([layer.router(other)[1].flatten() for other in inputs])
        received = int(((chosen >= 4 * rank) & (chosen < 4 * rank + 4)).sum())
        assert 0 < received != 40 * 2
        assert got["all_to_all"] == ep_expected_bytes(8, DIM, 40 * 2, received)["all_to_all"]


def test_capacity_drops_the_overflow_of_each_expert_in_token_order():
    moe = make_moe(capacity_factor=0.5)  # ceil(0.5 * 40 * 2 / 8) = 5 slots per expert
    x = tokens(40)
    out = moe(x)
    weights, experts, _, _ = moe.router(x)
    seen = [0] * 8
    kept_per_expert = [0] * 8
    for i, row in enumerate(x):
        want = torch.zeros(DIM)
        for j in range(2):
            e = int(experts[i, j])
            if seen[e] < 5:
                want = want + weights[i, j] * expert_output(moe, row, e)
                kept_per_expert[e] += 1
            seen[e] += 1
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    assert max(kept_per_expert) == 5
    assert moe.stats["dropped"] == sum(seen) - sum(kept_per_expert) > 0


def test_auxiliary_losses_reach_the_router_through_the_output():
    x = tokens(32).double()  # float64: the difference of two gradients is compared
    plain, balanced = make_moe(aux_loss_coef=0.0).double(), make_moe(aux_loss_coef=0.1, z_loss_coef=0.01).double()
    for moe in (plain, balanced):
        moe.train()
        moe(x).sum().backward()
    with torch.no_grad():
        _, experts, _, _ = balanced.router(x)
    logits = x @ balanced.router.gate.weight.detach().T
    gate = balanced.router.gate.weight.detach().clone().requires_grad_()
    scores = (x @ gate.T).softmax(-1)
    extra = 0.1 * load_balancing_loss(scores, experts, 8) + 0.01 * z_loss(x @ gate.T)
    (extra_grad,) = torch.autograd.grad(extra, gate)
    torch.testing.assert_close(balanced.router.gate.weight.grad - plain.router.gate.weight.grad, extra_grad,
                               rtol=1e-9, atol=1e-12)
    assert logits.shape == (32, 8) and extra_grad.abs().sum() > 0
    # balanced: E * sum f P = 1 when every expert gets the same share with uniform scores
    uniform = torch.full((16, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(16).remainder(4).view(8, 2), 4).item() == pytest.approx(1.0)


def test_loss_free_bias_moves_load_toward_balance():
    moe = make_moe(score_func="sigmoid", bias_update_rate=0.02, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.gate.weight[0] += 1.5  # expert 0 favoured by every token with a positive sum
    x = tokens(256).abs()
    moe.train()
    ratios = []
    for _ in range(60):
        moe.reset_counts()
        with torch.no_grad():
            moe(x)
        load = moe.tokens_per_expert
        ratios.append(float(load.max() / load.mean()))
        moe.update_expert_bias()
    assert ratios[0] > 3.0 and ratios[-1] < 1.6, ratios[::10]
    assert moe.router.expert_bias[0] < 0


def moe_overrides(*extra):
    return ["model.language.moe.num_experts=4", "model.language.moe.top_k=2", "model.language.moe.first_dense_layers=1",
            "model.language.moe.every=2", *extra]


def test_model_places_experts_and_counts_their_parameters():
    cfg = load_config(moe_overrides("model.language.moe.num_shared_experts=1"))
    model = build_model(cfg.model, "cpu")
    kinds = [type(b.feed_forward).__name__ for b in model.language.layers.values()]
    assert kinds == ["FeedForward", "MoE", "FeedForward", "MoE"]
    assert model_spec(cfg.model).num_params(cfg.model) == sum(p.numel() for p in model.parameters())
    dense = load_config([])
    lm = cfg.model.language
    per_token = model_spec(cfg.model).training_flops(cfg.model, 1, 1, 0) - model_spec(dense.model).training_flops(
        dense.model, 1, 1, 0)
    # each of the 2 MoE layers: router + (top_k + shared - 1 dense FFN) experts of intermediate_size, active
    assert per_token == pytest.approx(6.0 * 2 * (lm.hidden_size * 4 + 2 * 3 * lm.hidden_size * lm.intermediate_size))


@pytest.mark.parametrize("override, message", [
    ("model.language.moe.top_k=5", r"top_k=5 must lie in \[1, num_experts=4\]"),
    ("model.language.moe.num_groups=3", "num_groups=3 must divide num_experts=4"),
    ("model.language.moe.score_func=relu", "score_func='relu' is unknown"),
    ("model.language.moe.first_dense_layers=4", "leaves no mixture-of-experts layer"),
    ("model.language.moe.capacity_factor=-1", "capacity_factor=-1.0 must be >= 0"),
    ("parallel.ep=3", "parallel.ep=3 does not divide model.language.moe.num_experts=4"),
    ("parallel.ep=2", "parallel.ep=2 does not divide parallel.dp_shard=1; the ep ranks are data-parallel ranks"),
    ("model.language.moe.num_experts=0", "parallel.ep=2 needs a mixture of experts"),
])
def test_bad_expert_config_is_one_line(override, message):
    ep = ["parallel.ep=2", "parallel.dp_shard=2"] if "num_experts=0" in override else []
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config(moe_overrides(*ep, override)))
    assert "\n" not in str(err.value)


def test_gpt_kind_refuses_experts():
    with pytest.raises(ConfigError, match="kind=gpt has dense MLPs only"):
        model_spec(load_config(["model=gpt", "model.language.moe.num_experts=4"]).model).validate(
            load_config(["model=gpt", "model.language.moe.num_experts=4"]).model)


def test_training_logs_expert_load_and_updates_the_bias(make_cfg, tmp_path):
    cfg = make_cfg(*moe_overrides("model.language.moe.bias_update_rate=0.01", "model.language.moe.aux_loss_coef=0.01"),
                   "train.max_steps=4", "train.schedule.warmup_steps=1", "logger.log_every=1", "checkpoint.every=0")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 4
    layers = [str(i) for i in range(1, cfg.model.language.num_layers, 2)]  # first_dense_layers=1, every=2
    for r in train:
        assert {*(f"moe_load_max_over_mean/{i}" for i in layers), "moe_aux_loss", "moe_dropped_tokens"} <= set(r)
        assert 1.0 <= r["moe_load_max_over_mean"] <= 4.0 and r["moe_dropped_tokens"] == 0
        # every step logged: each window is that one step
        assert r["moe_load_max_over_mean"] == pytest.approx(r["moe_step_load_max_over_mean"])
    bias = trainer.model.language.layers["1"].feed_forward.router.expert_bias
    steps = bias / 0.01  # each update moves every expert's bias by -0.01, 0 or +0.01
    assert bias.abs().sum() > 0 and torch.allclose(steps, steps.round(), atol=1e-4)
    assert dataclasses.asdict(LanguageConfig())["moe"]["num_experts"] == 0  # dense by default


def test_the_logged_load_is_the_window_since_the_last_logged_step():
    """Two steps skewed in opposite directions: 1.5 x the mean each, balanced over the window."""
    from mmfm.train.experts import LoadWindow, max_over_mean

    window, steps = LoadWindow(), [torch.tensor([[30.0, 10.0]]), torch.tensor([[10.0, 30.0]])]
    assert max_over_mean(steps[0]) == max_over_mean(steps[1]) == [1.5]
    assert max_over_mean(window.add(steps[0])) == [1.5]
    assert max_over_mean(window.add(steps[1])) == [1.0]
    window.reset()
    assert max_over_mean(window.add(steps[1])) == [1.5]


def expert_base(synth_dir) -> list[str]:
    from conftest import SMALL_MODEL, STEPS

    # Without the auxiliary losses and the bias: each rank's padding differs from the one process's, and those
    # would count it (docs/moe.md)
    return [f"data.path={synth_dir}", *SMALL_MODEL, *STEPS, "data.partitions=4", "model.language.moe.num_experts=4",
            "model.language.moe.aux_loss_coef=0"]


@pytest.fixture(scope="module")
def one_process(synth_dir, tmp_path_factory):
    """3 AdamW steps of 8 samples in 2 micro-batches on one process, one matmul per expert: losses, grad norms and
    parameters."""
    from parallel_runs import local_full_params

    single = Trainer(load_config([*expert_base(synth_dir), "data.batch_size=4", "kernels.experts=loop"]),
                     tmp_path_factory.mktemp("single"))
    return single.fit(), local_full_params(single)


@pytest.mark.parametrize("world,layout", [
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    (4, ["parallel.dp_shard=4", "parallel.ep=2", "kernels.experts=loop"]),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"]),
    (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.ep=2"]),
    (8, ["parallel.pp=2", "parallel.dp_shard=4", "parallel.ep=2", "parallel.pp_microbatches=1"]),
    (4, ["parallel.tp=2", "parallel.dp_shard=2", "parallel.ep=2"]),
], ids=["fsdp2", "ep2", "ep2xfsdp2", "ep2xhsdp2", "ep2xpp2", "ep2xfsdp2xpp2", "ep2xtp2"])
def test_expert_layouts_train_as_one_process(world, layout, one_process, synth_dir, tmp_path):
    """N gloo processes against one, same 8 samples a step: the experts' gradients are reduced like every other
    parameter's (a dropped or doubled expert gradient moves its weights by ~lr = 1e-3, far outside atol 1e-4).
    Under ep each rank holds 2 of the 4 experts and its tokens reach them by all-to-all. The layouts run
    torch._grouped_mm (kernels.experts=auto on CPU) but ep2xfsdp2, which runs the reference's loop."""
    from parallel_runs import run_layout

    want, want_params = one_process
    replicas = 2 if "parallel.pp=2" in layout or "parallel.tp=2" in layout else 1  # ranks that read the same batch
    got = run_layout(world, [*expert_base(synth_dir), f"data.batch_size={8 * replicas // world // 2}", *layout],
                     tmp_path)
    for step, loss in want["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-5), step
        assert got["grad_norms"][step] == pytest.approx(want["grad_norms"][step], rel=1e-4), step
    assert any("experts.w2" in name for name in want_params)
    for name, value in want_params.items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-4, msg=name)


def test_resume_restores_the_balancing_bias(make_cfg, tmp_path):
    """The bias is state: a run stopped before step 4 and resumed from its step-3 checkpoint ends as a run in one
    go, bias and parameters bit for bit."""
    from test_train import Interrupted, StopsAt

    cfg = lambda: make_cfg(*moe_overrides("model.language.moe.bias_update_rate=0.01"), "train.max_steps=5",  # noqa: E731
                           "train.schedule.warmup_steps=1", "checkpoint.every=3")
    straight = Trainer(cfg(), tmp_path / "straight")
    straight.fit()
    with pytest.raises(Interrupted):
        StopsAt(cfg(), tmp_path / "stopped").fit()
    resumed = Trainer(cfg(), tmp_path / "stopped")
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(name.endswith("expert_bias") for name in a)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)
    assert straight.model.language.layers["1"].feed_forward.router.expert_bias.abs().sum() > 0


@pytest.mark.parametrize("model, total, active", [
    ("qwen3_235b_a22b", 235.09e9, 22.19e9),  # the release: 235B / 22B
    ("deepseek_v3", 671.03e9, 37.55e9),  # the report: 671B / 37B (without the multi-token-prediction module)
])
def test_moe_presets_count_the_published_sizes(model, total, active):
    """model=qwen3_235b_a22b and model=deepseek_v3: total and active parameters as published, on the meta device
    too."""
    from mmfm.models.llama import counts

    cfg = load_config([f"model={model}"])
    spec, lm = model_spec(cfg.model), cfg.model.language
    spec.validate(cfg.model)
    got = spec.num_params(cfg.model)
    assert got == pytest.approx(total, rel=1e-3)
    assert got - counts.matmul_params(lm) + counts.matmul_params(lm, active=True) == pytest.approx(active, rel=1e-3)
    model = build_model(cfg.model, "meta")
    assert sum(p.numel() for p in model.parameters()) == got


def lm_overrides(kind: str, *extra: str) -> list[str]:
    return ["model=gpt", f"model.language.kind={kind}", "model.language.num_kv_heads=2", "model.language.hidden_size=64",
            "model.language.num_heads=4", "model.language.num_layers=3", "model.language.intermediate_size=96",
            "model.language.vocab_size=128", "model.language.moe.num_experts=4", *extra]


def test_planner_counts_expert_parallelism_for_qwen3_235b():
    """mmfm plan on 64 H100s for Qwen3-235B-A22B: ep layouts are searched; against the same layout without ep, ep8
    holds the same parameter elements (E / ep experts, then FSDP over dp_shard / ep) but gathers only the rank's
    experts (smaller FSDP buffers), and pays its all-to-alls: 4 x tokens x top_k x hidden x 2 B per MoE layer and
    micro-batch, 7/8 of it off the rank, at the inter-node bandwidth."""
    from mmfm.plan.hardware import group_bandwidth
    from mmfm.plan.search import Layout, Workload, candidate_layouts, evaluate

    cfg = load_config(["model=qwen3_235b_a22b", "train.precision=bf16", "data.seq_len=4096"])
    wl = Workload(64, 64, 4096)
    assert {layout.ep for layout in candidate_layouts(cfg, wl)} >= {1, 2, 8, 64}
    dense, experts = (evaluate(cfg, Layout(pp=4, dp_shard=16, micro_batch=1, microbatches=4, checkpoint="full", ep=ep),
                               wl) for ep in (1, 8))
    assert experts.rank_params == dense.rank_params
    assert experts.memory["buffers"] < dense.memory["buffers"]
    lm = cfg.model.language
    layers = 94 // 4 + (94 % 4 > 0)  # the fullest stage's MoE layers, every layer being one
    payload = 4 * 4096 * lm.moe.top_k * lm.hidden_size * 2 + 8 * lm.moe.num_experts
    bandwidth = group_bandwidth(cfg.hardware, 8, 1)
    assert experts.time["ep_comm"] == pytest.approx(layers * 4 * payload * 7 / 8 / bandwidth, rel=0.05)
    assert dense.time["ep_comm"] == 0.0


def expert_slice(cfg, dims, rank: int) -> tuple[int, int]:
    """(how many, the first) of the experts whose weights `rank` holds, in the meta-device parallel model."""
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mmfm.parallel.parallelize import parallelize

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        parts = parallelize(cfg, dims, "cpu", dims.build_mesh("cpu"), materialize=False)
        w1 = next(p for part in parts.parts for n, p in part.named_parameters() if "experts.w1" in n)
        shape, offset = compute_local_shape_and_global_offset(w1.shape, w1.device_mesh, w1.placements)
        return shape[0], offset[0]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model, layout, ranks", [
    ("qwen3_235b_a22b", {"pp": 4, "dp_shard": 16, "ep": 8}, [0, 21, 63]),  # efsdp 2: experts sharded over pairs
    ("qwen3_235b_a22b", {"dp_shard": 64, "ep": 64}, [5]),  # 2 of the 128 experts per rank, no further sharding
    ("llava_qwen3_235b_a22b", {"pp": 4, "tp": 2, "dp_shard": 8, "ep": 4}, [0, 63]),  # the tower on stage 0
    ("deepseek_v3", {"pp": 4, "tp": 2, "dp_shard": 8, "ep": 8}, [0, 63]),  # latent attention under tp
], ids=["pp4xfsdp16xep8", "fsdp64xep64", "vlm-pp4xtp2xfsdp8xep4", "deepseek-pp4xtp2xfsdp8xep8"])
def test_moe_presets_shares_on_64_fake_ranks_equal_the_planners(model, layout, ranks):
    """Qwen3-235B-A22B's language model alone and behind a SigLIP tower, and DeepSeek-V3's, parallelized on the meta
    device on a fake 64-rank group: each rank holds exactly the elements mmfm.plan.shares counts for it (its stage,
    tp shards, E / ep experts, FSDP chunks), and its ep rank's block of experts; under ep 64 each rank holds 2
    experts' weights."""
    from test_plan import coordinates, meta_rank_numel

    from mmfm.parallel import ParallelDims
    from mmfm.plan.shares import rank_share, stage_layout

    cfg = load_config([f"model={model}", "data.seq_len=4096", "train.precision=bf16",
                       *(f"parallel.{k}={v}" for k, v in layout.items())])
    dims = ParallelDims.from_config(cfg.parallel)
    for rank in ranks:
        at = coordinates(dims, rank)
        everything = [list(range(cfg.model.language.num_layers))]
        layers = stage_layout(cfg.model, cfg.data.seq_len, dims.num_stages) if dims.pp > 1 else everything
        stage = [(layers[at["pp"]], at["pp"] == 0, at["pp"] == dims.pp - 1)]
        want = rank_share(cfg.model, dims.tp, dims.dp_shard, stage, at["dp_shard"], ep=dims.ep)
        assert meta_rank_numel(cfg, dims, rank) == want.numel, rank
    lm = cfg.model.language
    # in a fresh process: one process simulating several ranks gets meshes sliced for an earlier rank back
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        experts, first = pool.submit(expert_slice, cfg, dims, ranks[-1]).result()
    at = coordinates(dims, ranks[-1])
    ep_rank, efsdp_rank = at["dp_shard"] % dims.ep, at["dp_shard"] // dims.ep
    per_ep_rank = lm.moe.num_experts // dims.ep
    assert experts == per_ep_rank * dims.ep // dims.dp_shard  # E / ep, split further over efsdp
    assert first == ep_rank * per_ep_rank + efsdp_rank * experts  # its ep rank's block, then its efsdp chunk
    if dims.ep == 64:
        per_rank_experts = 94 * 3 * 2 * lm.hidden_size * lm.moe.expert_intermediate_size
        assert want.numel > per_rank_experts > 0.9 * want.numel


@pytest.mark.parametrize("kind, extra, message", [
    ("llama", [], "kind=llama has no Hugging Face mixture-of-experts form (qwen3 has: Qwen3MoeForCausalLM)"),
    ("qwen3", ["model.language.moe.num_shared_experts=1"], "num_shared_experts=1 has no place in Qwen3MoeForCausalLM"),
    ("qwen3", ["model.language.moe.score_func=sigmoid"], "score_func=sigmoid has no place"),
    ("qwen3", ["model.language.moe.every=2"],  # layers 0 and 2; Qwen3-MoE's step 2 would put them on 1 and 3
     "experts from layer 0 every 2: Qwen3-MoE's sparse layers are those i with (i + 1) a multiple"),
])
def test_hugging_face_export_refuses_what_qwen3_moe_cannot_hold(kind, extra, message, tmp_path):
    from mmfm.checkpoint.hf import HFCheckpointError, export_language

    lm = build_model(load_config(lm_overrides(kind, *extra)).model, "cpu").language
    with pytest.raises(HFCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+"))\
            as err:
        export_language(lm, tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """A tiny random Qwen3MoeForCausalLM saved in 40 KB shards: 3 layers, the first dense (mlp_only_layers), 4
    experts of width 24, top-2 renormalized, q/k norms."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                            max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("qwen3_moe") / "hf"
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder, model


def logits_of(model, lm=None) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return lm(lm.embed(ids)) if lm is not None else model(ids).logits


def test_qwen3_moe_import_matches_transformers_logits(qwen3_moe):
    """Import: model.language with the experts placed and sized as config.json says, logits within 1e-4 of
    transformers' (both compute the same math in fp32; a wrong expert transposition or order moves them by 1e-1)."""
    from mmfm.checkpoint.hf import language_model_from_hf

    folder, model = qwen3_moe
    assert len(list(folder.glob("*.safetensors"))) > 1
    lm = language_model_from_hf(folder)
    moe = lm.cfg.moe
    assert (lm.cfg.kind, moe.num_experts, moe.top_k, moe.expert_intermediate_size) == ("qwen3", 4, 2, 24)
    assert (moe.first_dense_layers, moe.every, moe.normalize_weights) == (1, 1, True)
    assert [type(b.feed_forward).__name__ for b in lm.layers.values()] == ["FeedForward", "MoE", "MoE"]
    assert (logits_of(None, lm) - logits_of(model)).abs().max().item() <= 1e-4


def test_qwen3_moe_export_round_trip(qwen3_moe, tmp_path):
    """Export: transformers loads the folder, its logits equal ours and its weights the original's bit for bit."""
    from transformers import Qwen3MoeForCausalLM

    from mmfm.checkpoint.hf import export_language, language_config_from_hf, language_model_from_hf

    folder, model = qwen3_moe
    lm = language_model_from_hf(folder)
    export_language(lm, tmp_path / "out", max_shard_bytes=100_000)
    back = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits_of(back) - logits_of(None, lm)).abs().max().item() <= 1e-4
    theirs, ours = model.state_dict(), back.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert language_config_from_hf(tmp_path / "out") == lm.cfg


def test_qwen3_moe_loads_each_ranks_experts_under_expert_parallelism(qwen3_moe, tmp_path):
    """ep2 (FSDP over the same 2 ranks for the rest): each rank reads 2 of the 4 experts' tensors into its shard, and
    the gathered weights equal the one-process import exactly."""
    import torch.multiprocessing as mp
    from expert_runs import load_worker

    from mmfm.checkpoint.hf import language_model_from_hf
    from mmfm.models.init import canonical_name
    from mmfm.parallel.distributed import free_port

    folder, _ = qwen3_moe
    want = {n: p.detach() for n, p in language_model_from_hf(folder).named_parameters()}
    mp.spawn(load_worker, args=(2, free_port(), str(folder), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got["local_experts"].values()) == {2}  # half the experts each (2 layers x w1, w2, w3)
        params = {canonical_name(n): p for n, p in got["params"].items()}
        assert set(params) == set(want)
        for name, value in want.items():
            assert torch.equal(params[name], value), name


def test_qwen3_moe_checkpoint_of_other_experts_is_refused(qwen3_moe):
    """A model with 8 experts against the 4-expert checkpoint: one line naming the field, before any weight moves."""
    from mmfm.checkpoint.hf import HFCheckpointError, language_config_from_hf, load_language

    folder, _ = qwen3_moe
    cfg = language_config_from_hf(folder)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=8))
    lm = build_model(load_config(["model=gpt"]).model.__class__(language=cfg), "cpu").language
    with pytest.raises(HFCheckpointError, match=r"moe.num_experts=8 \(checkpoint: 4\)") as err:
        load_language(lm, folder)
    assert "\n" not in str(err.value)
