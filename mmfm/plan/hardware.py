"""Checks and link choices for HardwareConfig (mmfm.config.schema; presets in mmfm/configs/hardware/)."""

from __future__ import annotations

from mmfm.config.schema import HardwareConfig
from mmfm.errors import ConfigError

POSITIVE = ("peak_bf16_flops", "hbm_bytes", "hbm_bandwidth", "devices_per_node", "intra_node_bandwidth",
            "inter_node_bandwidth")


def validate_hardware(hw: HardwareConfig) -> HardwareConfig:
    """Raise a one-line ConfigError naming the field; return hw when every figure is usable."""
    for key in POSITIVE:
        if not getattr(hw, key) > 0:
            raise ConfigError(f"hardware.{key}={getattr(hw, key)} must be > 0 (see mmfm/configs/hardware/{hw.name}"
                              ".yaml for the units)")
    if hw.peak_fp8_flops < 0:
        raise ConfigError(f"hardware.peak_fp8_flops={hw.peak_fp8_flops} must be >= 0 (0: no fp8)")
    if not 0 < hw.achievable <= 1:
        raise ConfigError(f"hardware.achievable={hw.achievable} must lie in (0, 1]: the fraction of peak FLOP/s "
                          "that training reaches (e.g. 0.5, or a measured MFU)")
    return hw


def group_bandwidth(hw: HardwareConfig, group_size: int, stride: int) -> float:
    """Bytes/s per device of a collective over `group_size` ranks spaced `stride` apart in rank order: the
    intra-node link when the whole group fits in one node (group_size x stride <= devices_per_node), else the
    inter-node link (a ring over nodes is as slow as its slowest hop)."""
    return hw.intra_node_bandwidth if group_size * stride <= hw.devices_per_node else hw.inter_node_bandwidth
