"""What `mmfm plan` and parallel=auto say about a plan: its one-line description, the overrides that run its layout,
and the one-line error when nothing fits (docs/planning.md)."""

from __future__ import annotations

from mmfm.errors import MmfmError

GIB = 2 ** 30
STATE_TERMS = ("params", "grads", "optimizer", "buffers")
ACTIVATION_TERMS = ("activations", "logits")


class NothingFits(MmfmError):
    """No layout of the job fits the device memory."""


def describe(layout) -> str:
    pipe = "" if layout.pp == 1 else f" {layout.schedule} x{layout.virtual}"
    experts = f" ep={layout.ep}" if layout.ep > 1 else ""
    return (f"tp={layout.tp} pp={layout.pp}{pipe} dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard}"
            f"{experts} micro-batch={layout.micro_batch} ckpt={layout.checkpoint}")


def layout_overrides(layout) -> list[str]:
    """The overrides of parallel.*, data.batch_size, train.grad_accum_steps and train.activation_checkpoint that run
    `layout`: with a pipeline each loader batch holds all of a step's micro-batches (grad_accum_steps=1), else one
    micro-batch per accumulation step."""
    out = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.dp_replicate={layout.dp_replicate}",
           f"parallel.dp_shard={layout.dp_shard}", f"parallel.ep={layout.ep}"]
    if layout.pp > 1:
        out += [f"parallel.pp_schedule={layout.schedule}", f"parallel.pp_virtual_stages={layout.virtual}",
                f"parallel.pp_microbatches={layout.microbatches}",
                f"data.batch_size={layout.micro_batch * layout.microbatches}", "train.grad_accum_steps=1"]
    else:
        out += [f"data.batch_size={layout.micro_batch}", f"train.grad_accum_steps={layout.microbatches}"]
    return out + [f"train.activation_checkpoint={layout.checkpoint}"]


def nothing_fits(result, hw) -> str:
    """One line: the least-memory layout, its largest term against the usable memory, and what to change."""
    plan, usable = result.closest, result.usable_bytes
    state = sum(plan.memory[t] for t in STATE_TERMS)
    acts = sum(plan.memory[t] for t in ACTIVATION_TERMS)
    term, value = ("model state (parameters, gradients, AdamW, buffers)", state) if state >= acts else \
        ("activations", acts)
    if state >= acts:
        advice = "add devices (more FSDP shards), raise tp or pp, or use a device with more memory"
    elif plan.layout.checkpoint != "full":
        advice = "use activation checkpointing, a smaller micro-batch or seq_len, or larger tp / pp"
    else:
        advice = "use a shorter seq_len, larger tp, more pipeline stages or more devices"
    return (f"nothing fits in {usable / GIB:.1f} GiB per device ({hw.name}, {hw.hbm_bytes / GIB:.0f} GiB less the "
            f"reserve): the least-memory layout ({describe(plan.layout)}) needs {plan.memory['total'] / GIB:.1f} GiB, "
            f"{(plan.memory['total'] - usable) / GIB:.1f} GiB over; its largest term, {term}, is {value / GIB:.1f} GiB "
            f"({value / usable:.2f}x the usable memory): {advice}")
