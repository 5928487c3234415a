"""mmfm plan: hardware presets, each rank's exact parameter share against the meta-device layout, the cost model's
terms, and the command (ranked table, JSON, nothing fits). Pure: meta device and a fake process group only."""

import pytest
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from mmfm.config import ConfigError, load_config
from mmfm.parallel import ParallelDims
from mmfm.parallel.parallelize import parallelize
from mmfm.plan.hardware import validate_hardware
from mmfm.plan.shares import rank_share, stage_layout

HARDWARE = {"h100": (989.4e12, 80), "h200": (989.4e12, 140), "a100_80gb": (312e12, 80), "ascend_910b": (320e12, 64)}


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_presets_load_and_validate(name):
    hw = validate_hardware(load_config([f"hardware={name}"]).hardware)
    peak, gib = HARDWARE[name]
    assert hw.name == name and hw.peak_bf16_flops == peak and round(hw.hbm_bytes / 2**30) == gib
    assert hw.devices_per_node == 8 and 0 < hw.inter_node_bandwidth < hw.intra_node_bandwidth < hw.hbm_bandwidth


def test_default_hardware_is_h100_and_bad_figures_are_named():
    assert load_config([]).hardware.name == "h100"
    with pytest.raises(ConfigError, match=r"^hardware.achievable=1.5 must lie in \(0, 1\]"):
        validate_hardware(load_config(["hardware.achievable=1.5"]).hardware)
    with pytest.raises(ConfigError, match="^hardware.hbm_bytes=0 must be > 0"):
        validate_hardware(load_config(["hardware=a100_80gb", "hardware.hbm_bytes=0"]).hardware)


def coordinates(dims: ParallelDims, rank: int) -> dict[str, int]:
    """rank -> its index along each mesh dim (outermost first: pp, dp_replicate, dp_shard, cp, tp)."""
    out = {}
    for name, size in reversed(list(dims.sizes.items())):
        out[name], rank = rank % size, rank // size
    return out


def meta_rank_numel(cfg, dims: ParallelDims, rank: int) -> int:
    """What parallelize() gives `rank` on the meta device: the elements of its local parameter shards."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        parts = parallelize(cfg, dims, "cpu", dims.build_mesh("cpu"), materialize=False)
        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parts.parameters())
    finally:
        dist.destroy_process_group()


def planner_rank_numel(cfg, dims: ParallelDims, rank: int) -> int:
    at = coordinates(dims, rank)
    layers = stage_layout(cfg.model, cfg.data.seq_len, dims.num_stages) if dims.pp > 1 else [[]]
    stages = [(layers[s], s == 0, s == dims.num_stages - 1)
              for s in range(at["pp"], dims.num_stages, dims.pp)] if dims.pp > 1 else [(list(range(99)), True, True)]
    return rank_share(cfg.model, dims.tp, dims.dp_shard * dims.cp, stages, at["dp_shard"] * dims.cp + at["cp"]).numel


@pytest.mark.parametrize("model,layout,ranks", [
    ("vlm_7b", {"tp": 2, "pp": 2}, [0, 3]),
    ("vlm_7b", {"dp_shard": 2}, [1]),
    ("llava15_7b", {"tp": 2}, [0]),
    ("llava15_7b", {"pp": 2, "dp_shard": 2}, [3]),
], ids=["vlm_7b-tp2xpp2", "vlm_7b-fsdp2", "llava15_7b-tp2", "llava15_7b-pp2xfsdp2"])
def test_parameter_share_equals_the_meta_device_layout_exactly(model, layout, ranks):
    cfg = load_config([f"model={model}", "data.seq_len=4096", "train.precision=bf16"]
                      + [f"parallel.{k}={v}" for k, v in layout.items()])
    dims = ParallelDims.from_config(cfg.parallel)
    for rank in ranks:
        expected = planner_rank_numel(cfg, dims, rank)  # before the fake group of the real layout
        assert meta_rank_numel(cfg, dims, rank) == expected, rank


def test_tensor_parallel_shapes_derived_from_a_larger_tp_equal_the_plan_applied():
    from mmfm.plan.shares import _derive_tp_shapes, _read_tp_shapes

    cfg = load_config(["model=llava15_7b"]).model
    at_two = _read_tp_shapes(cfg, 2)
    assert _derive_tp_shapes(cfg, _read_tp_shapes(cfg, 8), 8, 2) == at_two
    assert at_two["language.layers.0.feed_forward.w2.weight"] == (4096, 11008 // 2)  # row-wise: split by input
    assert at_two["language.layers.0.attention.wq.weight"] == (4096 // 2, 4096)  # column-wise: split by output


def test_model_state_is_16_bytes_per_held_parameter_and_activations_follow_the_formula():
    from mmfm.plan import memory

    assert memory.model_state_bytes(1000) == {"params": 4000, "grads": 4000, "optimizer": 8000}
    lm = load_config(["model=vlm_7b"]).model.language  # h 4096, 32 heads = 32 kv heads of 128, f 11008
    t, h, f = 4096, 4096, 11008
    # FSDP (bf16 residual stream), fused norm and SwiGLU: norm inputs and 1/rms, one bf16 input of the attention
    # projections and one of the MLP's, q k v, the attention output and its copy, the log-sum-exp, SwiGLU
    per_position = 2 * (2 * h + 4) + 2 * (2 * h) + 2 * 5 * h + 4 * 32 + 2 * 3 * f
    assert memory.decoder_layer_bytes(lm, t, residual=2) == t * per_position
    # tp=8 without FSDP (fp32 stream, the PyTorch norm): fp32 input and output of each norm, 5 bf16 casts
    per_position_tp8 = 2 * (8 * h + 4) / 8 + 2 * 5 * h + 2 * 5 * h / 8 + 4 * 32 / 8 + 2 * 3 * f / 8
    assert memory.decoder_layer_bytes(lm, t, tp=8, fused_norm=False, residual=4) == t * per_position_tp8
    assert memory.checkpointed_layer_bytes(h, t, tp=8, residual=4) == 4 * t * h / 8
    assert [memory.in_flight("1f1b", 4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight("gpipe", 4, 1, 8, 0) == 8
    assert memory.in_flight("interleaved_1f1b", 4, 2, 8, 0) == 4 + 3 / 2  # Megatron: pp + (pp - 1) / v
    from mmfm.plan.steptime import bubble_fraction

    assert bubble_fraction(4, 8) == 3 / 11 and bubble_fraction(4, 8, 2) == 3 / 19 and bubble_fraction(1, 8) == 0


def run_plan(capsys, *args):
    from mmfm.cli.main import main

    try:
        code = main(["plan", *args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


ACCEPTANCE = ["model=vlm_7b", "hardware=h100", "devices=64", "global_batch=512", "seq_len=4096"]


def test_plan_prints_a_ranked_table_for_the_acceptance_example_fast(capsys):
    import time

    start = time.perf_counter()
    code, out, _ = run_plan(capsys, *ACCEPTANCE, "--top", "5", "--explain")
    assert code == 0 and time.perf_counter() - start < 10
    lines = out.splitlines()
    assert lines[0].startswith("mmfm plan: vlm_7b (7.06B parameters) on 64 x h100") and "layouts fit" in lines[0]
    rows = [line for line in lines if line[:3].strip().isdigit()]
    assert len(rows) == 5
    steps = [float(row.split("|")[2].split()[0]) for row in rows]
    # fastest first; step times within 0.5% count as equal (then the smaller memory first)
    assert all(later >= earlier * 0.99 for earlier, later in zip(steps, steps[1:])) and 1 < steps[0] < 10
    assert "top plan" in out and "compute" in out and "bubble" in out
    launch = lines[-1].split()
    assert launch[:2] == ["mmfm", "launch"] and "model=vlm_7b" in launch and "cluster.nodes=8" in launch
    assert {"train.precision=bf16", "data.seq_len=4096", "cluster=slurm"} <= set(launch)


def test_plan_json_holds_dims_memory_step_time_mfu_and_params(capsys):
    import json

    code, out, _ = run_plan(capsys, *ACCEPTANCE, "--format", "json", "--top", "3")
    data = json.loads(out)
    assert code == 0 and data["params"] == 7_062_899_712 and data["hardware"] == "h100" and len(data["plans"]) == 3
    best = data["plans"][0]
    lay = best["layout"]
    assert lay["tp"] * lay["pp"] * lay["dp_replicate"] * lay["dp_shard"] * lay["cp"] == 64
    assert lay["micro_batch"] * lay["microbatches"] * lay["dp_replicate"] * lay["dp_shard"] == 512
    mem = best["memory_bytes"]
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    assert mem["total"] <= 0.9 * 80 * 2**30 and mem["params"] == 4 * best["rank_params"]
    assert best["time_s"]["step"] >= best["time_s"]["compute"] > 0 and 0 < best["mfu"] <= 0.5
    # its overrides compose into a layout that the trainer's own checks accept at 64 processes
    run = load_config([o for o in best["overrides"] if not o.startswith("cluster")])
    dims = ParallelDims.from_config(run.parallel).validate(run.model, world_size=64)
    dims.validate_run(run.data.seq_len, run.train.grad_accum_steps, run.data.batch_size)
    assert run.data.batch_size * run.train.grad_accum_steps * dims.dp_size == 512
    # MFU and tokens/s/device agree: model FLOPs per token x tokens/s/device = MFU x peak
    from mmfm.models import model_spec

    cfg = load_config(["model=vlm_7b"]).model
    flops = model_spec(cfg).training_flops(cfg, 512 * 4096, 4096, 512) / (512 * 4096)
    assert flops * best["tokens_per_s_per_device"] == pytest.approx(best["mfu"] * 989.4e12)


def test_nothing_fits_names_the_largest_term_and_the_fix(capsys):
    code, out, err = run_plan(capsys, "model=llava_qwen15_110b", "hardware=a100_80gb", "devices=8",
                              "global_batch=8", "seq_len=4096")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("mmfm plan: error: nothing fits in 72.0 GiB per device (a100_80gb")
    assert "model state (parameters, gradients, AdamW, buffers)" in err and "add devices" in err


def test_plan_refuses_a_missing_job_size(capsys):
    code, _, err = run_plan(capsys, "model=vlm_7b", "devices=64")
    assert code == 2 and err.strip() == ("mmfm plan: error: global_batch= is missing; e.g. mmfm plan model=vlm_7b "
                                         "devices=64 global_batch=512 seq_len=4096")


# ---- parallel.dp_shard=-1 (the rest of the world) and parallel=auto (mmfm.config.world, mmfm.plan.auto)

def test_minus_one_takes_the_rest_of_the_world():
    from mmfm.config.schema import ParallelConfig
    from mmfm.config.world import World, rest_of_world

    world = World(128, "cluster.nodes=16 x cluster.gpus_per_node=8", 8)
    assert rest_of_world(ParallelConfig(dp_shard=-1, tp=8), world) == ["parallel.dp_shard=16"]
    assert rest_of_world(ParallelConfig(dp_replicate=-1, dp_shard=8, tp=2), world) == ["parallel.dp_replicate=8"]
    assert rest_of_world(ParallelConfig(dp_shard=-1, tp=8, pp=16), world) == ["parallel.dp_shard=1"]
    assert rest_of_world(ParallelConfig(dp_shard=4), world) == []  # nothing open: nothing to say
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard=-1 takes the rest of the world, but the world of 128 "
                                          r"process\(es\) \(cluster.nodes=16 x cluster.gpus_per_node=8\) does not "
                                          r"divide by the other dims \(tp=8 x pp=3 = 24\)"):
        rest_of_world(ParallelConfig(dp_shard=-1, tp=8, pp=3), world)
    with pytest.raises(ConfigError, match="^parallel.pp=-1: only parallel.dp_shard or parallel.dp_replicate may be"):
        rest_of_world(ParallelConfig(pp=-1), world)
    with pytest.raises(ConfigError, match="^parallel.dp_replicate=-1 and parallel.dp_shard=-1: only one dim"):
        rest_of_world(ParallelConfig(dp_replicate=-1, dp_shard=-1), world)
    with pytest.raises(ConfigError, match="^parallel.dp_shard=0 must be >= 1 "):
        rest_of_world(ParallelConfig(dp_shard=0), world)
    with pytest.raises(ConfigError, match="^parallel.dp_shard=-1 takes the rest of the world, but the world size is "
                                          "unknown: why"):
        rest_of_world(ParallelConfig(dp_shard=-1), World(None, "why"))
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard=-1 \(the rest of the world\) is not resolved here"):
        ParallelDims.from_config(ParallelConfig(dp_shard=-1)).validate(load_config([]).model)


def test_the_world_comes_from_the_cluster_or_torchrun(monkeypatch):
    from mmfm.config.schema import ClusterConfig
    from mmfm.config.world import World, cluster_world, env_world

    assert cluster_world(ClusterConfig(nodes=16, gpus_per_node=8)) == \
        World(128, "cluster.nodes=16 x cluster.gpus_per_node=8", 8)
    assert cluster_world(ClusterConfig(nodes=2, gpus_per_node=8, procs_per_node=4)).size == 8
    assert cluster_world(ClusterConfig()).size is None
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world().size == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert env_world() == World(8, "WORLD_SIZE=8", 4)


def test_preflight_resolves_minus_one_from_world_size(monkeypatch, capsys):
    from conftest import SMALL_MODEL
    from mmfm.config import preflight

    monkeypatch.setenv("WORLD_SIZE", "4")
    checked = preflight(load_config([*SMALL_MODEL, "parallel.dp_shard=-1", "parallel.tp=2"]))
    assert checked.dims.sizes == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}
    assert checked.cfg.parallel.dp_shard == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard=-1 takes the rest of the world, but the world of 3 "
                                          r"process\(es\) \(WORLD_SIZE=3\) does not divide by the other dims \(tp=2"):
        preflight(load_config([*SMALL_MODEL, "parallel.dp_shard=-1", "parallel.tp=2"]))


def test_preflight_plans_parallel_auto_and_rank_zero_says_so(monkeypatch, capsys):
    from conftest import SMALL_MODEL
    from mmfm.config import preflight
    from mmfm.plan.search import Workload, search

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    overrides = [*SMALL_MODEL, "parallel=auto", "train.global_batch=16"]
    checked = preflight(load_config(overrides))
    assert capsys.readouterr().err == ""  # only rank 0 prints the plan
    cfg = load_config(overrides)
    best = search(cfg, Workload(2, 16, cfg.data.seq_len)).plans[0].layout
    run = checked.cfg
    assert (checked.dims.tp, checked.dims.pp, checked.dims.dp_replicate, checked.dims.dp_shard) == \
        (best.tp, best.pp, best.dp_replicate, best.dp_shard)
    # the run is the config with `mmfm plan`'s overrides of the top plan
    from mmfm.plan.report import layout_overrides

    expected = load_config(overrides + layout_overrides(best) + ["parallel.auto=false"])
    assert (run.parallel, run.data, run.train) == (expected.parallel, expected.data, expected.train)
    assert run.data.batch_size * run.train.grad_accum_steps * checked.dims.dp_size == 16 == run.train.global_batch
    monkeypatch.setenv("RANK", "0")
    preflight(load_config(overrides))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mmfm: parallel=auto chose tp=") and "(WORLD_SIZE=2)" in err[0]


def test_auto_global_batch_is_train_global_batch_else_the_configs_own():
    from mmfm.plan.auto import global_batch

    assert global_batch(load_config(["parallel=auto", "data.batch_size=4", "train.grad_accum_steps=2"]), 128) == \
        (1024, "data.batch_size=4 x train.grad_accum_steps=2 x 128 device(s)")
    assert global_batch(load_config(["parallel=auto", "train.global_batch=512"]), 128) == (512, "train.global_batch")
    assert load_config(["parallel=auto"]).train.precision == "bf16"  # the planner models bf16 only
