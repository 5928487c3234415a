"""mmfm plan against runs: the predicted activation memory of one micro-batch against the peak measured on CPU
(mmfm.plan.bench), and the planner's communication bytes per step against CommCounter's (mmfm bench parallel)."""

import pytest

from mmfm.plan.bench import activation_bench

# A language model a few hundred wide (GQA 6:2 heads of 64), several layers, a sequence of a few hundred.
MID_SIZE = ["model.language.hidden_size=384", "model.language.num_layers=6", "model.language.num_heads=6",
            "model.language.num_kv_heads=2", "model.language.intermediate_size=1024",
            "model.language.max_seq_len=512", "data.seq_len=384"]
CONFIGS = {"tiny": (["data.seq_len=128"], 8), "mid": (MID_SIZE, 2)}  # overrides, micro-batch


@pytest.mark.parametrize("checkpoint", ["none", "full"])
@pytest.mark.parametrize("config", CONFIGS)
def test_predicted_activation_memory_is_within_15_percent_of_the_measured_peak(config, checkpoint):
    overrides, micro_batch = CONFIGS[config]
    result = activation_bench([*overrides, f"train.activation_checkpoint={checkpoint}"], micro_batch)
    ratio = result["measured"] / result["predicted"]
    assert 0.85 <= ratio <= 1.15, (config, checkpoint, result)
    assert min(result["terms"].values()) > 0
