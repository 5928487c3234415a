"""The planner against published runs: the Megatron-LM GPT weak-scaling runs of Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM" (SC21, arXiv:2104.04473), Table 1: GPT models
of vocabulary 51,200 and sequence 2048 on DGX A100 80 GB nodes (312 TFLOP/s bf16 peak), with full activation
recomputation. docs/planning.md records the comparison; tests/test_gpt.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmfm.config.schema import JobConfig

VOCAB, SEQ_LEN = 51200, 2048


@dataclass(frozen=True)
class PublishedRun:
    """One row of Table 1 as printed: parameters in billions (one decimal), attention heads, hidden size, layers,
    tensor- and pipeline-parallel sizes, GPUs, global batch (samples), achieved TFLOP/s per GPU, % of peak."""

    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float
    peak_percent: int

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


MEGATRON_GPT = (
    PublishedRun(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    PublishedRun(3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    PublishedRun(7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    PublishedRun(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    PublishedRun(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    PublishedRun(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    PublishedRun(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    PublishedRun(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    PublishedRun(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    PublishedRun(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
)


def run_config(run: PublishedRun, *overrides: str) -> JobConfig:
    """model=gpt at the row's sizes on hardware=a100_80gb, bf16 (the planner's precision)."""
    from mmfm.config import load_config

    return load_config(["model=gpt", "hardware=a100_80gb", "train.precision=bf16",
                        f"model.language.hidden_size={run.hidden}", f"model.language.num_heads={run.heads}",
                        f"model.language.num_layers={run.layers}", f"model.language.vocab_size={VOCAB}",
                        f"model.language.max_seq_len={SEQ_LEN}", *overrides])


def paper_params(run: PublishedRun) -> int:
    """The paper's Eq. 2, P = 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h)): layers, token and position
    embeddings (the final LayerNorm's 2h left out)."""
    l, h = run.layers, run.hidden
    return 12 * l * h * h + 13 * l * h + (VOCAB + SEQ_LEN) * h


def paper_flops(run: PublishedRun) -> float:
    """The paper's Eq. 3, FLOPs of one step, F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h)): matmuls with the
    recomputed forward pass. Its TFLOP/s per GPU are F / (step time x GPUs)."""
    b, s, l, h = run.batch, SEQ_LEN, run.layers, run.hidden
    return 96 * b * s * l * h * h * (1 + s / (6 * h) + VOCAB / (16 * l * h))


def published_layouts(cfg: JobConfig, run: PublishedRun) -> list:
    """The planner's candidate layouts with the run's tp, pp and dp (any dp_replicate x dp_shard, micro-batch and
    schedule) and full activation recomputation, as the published runs had."""
    from mmfm.plan.search import Workload, candidate_layouts

    wl = Workload(run.gpus, run.batch, SEQ_LEN)
    return [lay for lay in candidate_layouts(cfg, wl) if (lay.tp, lay.pp, lay.dp, lay.checkpoint) ==
            (run.tp, run.pp, run.dp, "full")]


def published_plans(run: PublishedRun) -> list:
    """The published layouts evaluated by the planner (mmfm.plan.search.evaluate), those that fit, fastest first."""
    from mmfm.plan.search import Workload, evaluate, rank_key

    cfg = run_config(run)
    wl = Workload(run.gpus, run.batch, SEQ_LEN)
    plans = [evaluate(cfg, layout, wl) for layout in published_layouts(cfg, run)]
    return sorted((p for p in plans if p.fits), key=rank_key)


def predicted_tflops(run: PublishedRun, plan) -> float:
    """TFLOP/s per GPU as the paper counts them (Eq. 3) at the planner's predicted step time."""
    return paper_flops(run) / (plan.time["step"] * run.gpus) / 1e12


def comparison_table() -> str:
    """docs/planning.md's table: each row's published layout, whether it fits, the predicted and published TFLOP/s
    per GPU and their ratio, and the plan predicted (schedule, micro-batch, data-parallel split)."""
    from mmfm.models import model_spec

    lines = ["| row | parameters (mmfm) | tp, pp, dp | fits | predicted TFLOP/s/GPU | published | ratio | plan predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for run in MEGATRON_GPT:
        cfg = run_config(run).model
        plans = published_plans(run)
        lay = plans[0].layout if plans else None
        predicted = predicted_tflops(run, plans[0]) if plans else float("nan")
        schedule = "-" if not lay or lay.pp == 1 else f"{lay.schedule} x{lay.virtual}"
        plan = f"{schedule}, micro-batch {lay.micro_batch}, dp {lay.dp_replicate} x {lay.dp_shard}" if lay else "-"
        lines.append(f"| {run.params_b:g}B | {model_spec(cfg).num_params(cfg):,} | {run.tp}, {run.pp}, {run.dp} | "
                     f"{'yes' if plans else 'no'} | {predicted:.1f} | {run.tflops:g} | {predicted / run.tflops:.2f} | "
                     f"{plan} |")
    return "\n".join(lines)
