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
