"""The planner against the published Megatron-LM GPT runs (docs/planning.md): python benchmarks/megatron_gpt.py prints
the table of predicted and published TFLOP/s per GPU (a few seconds, no GPU)."""

from mmfm.plan.published import comparison_table

if __name__ == "__main__":
    print(comparison_table())
