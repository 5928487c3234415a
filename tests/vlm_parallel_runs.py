"""An imported LLaVA folder at tp=2, fsdp=2 and pp=2 on gloo processes, for tests/test_hf_vlm_parallel.py: a module
of its own so that the spawned workers do not import transformers."""

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from mmfm.checkpoint.hf_vlm import model_config_from_hf
from mmfm.config.schema import JobConfig
from mmfm.models.init import canonical_name
from mmfm.parallel.dims import ParallelDims
from mmfm.parallel.pipeline_parallel import build_schedule
from mmfm.parallel.parallelize import parallelize

WORLD = 2
LAYOUTS = {"tp": dict(tp=2), "fsdp": dict(dp_shard=2),
           # stage 0: tower, projector, embedding and decoder layer 0; stage 1: layer 1, norm, output
           "pp": dict(pp=2, pp_layers=[1, 1], pp_schedule="gpipe")}


def shard_dim(p):
    if not isinstance(p, DTensor):
        return None
    return next((pl.dim for pl in p.placements if pl.is_shard()), None)


def layout_run(folder: str, layout: str, ids: torch.Tensor, pixels: torch.Tensor) -> dict:
    """This rank's parameters as parallelize loaded them ({name: (local tensor, split dim or None)}) and the
    logits [B, T, V] in full (None on the first pipeline stage)."""
    job = JobConfig(model=model_config_from_hf(folder))
    job.model.pretrained.vlm = folder
    job.data.seq_len = ids.shape[1]
    dims = ParallelDims(**LAYOUTS[layout])
    mesh = dims.build_mesh("cpu")
    parts = parallelize(job, dims, torch.device("cpu"), mesh)  # materializes and loads model.pretrained
    parts.train(False)
    params = {canonical_name(n): ((p.to_local() if isinstance(p, DTensor) else p).detach().clone(), shard_dim(p))
              for part in parts.parts for n, p in part.named_parameters()}
    with torch.no_grad():
        if layout == "pp":
            stage = PipelineStage(parts.parts[0], parts.stages[0], parts.num_stages, torch.device("cpu"),
                                  group=parts.group("pp"))
            schedule = build_schedule(dims.pp_schedule, [stage], dims.microbatches_per_batch, None)
            # images per sample ([B, 1, C, H, W]) so that the batch splits into micro-batches along dim 0
            args = (ids, pixels.unsqueeze(1)) if parts.has_first_stage else ()
            logits = schedule.eval(*args)
        else:
            logits = parts.parts[0](ids, pixels)
    if isinstance(logits, DTensor):  # tp: split over the vocabulary
        logits = logits.full_tensor()
    return {"params": params, "stages": parts.stages,
            "logits": None if logits is None else logits.detach().clone()}


def worker(rank: int, port: int, folders: dict, ids: torch.Tensor, pixels: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    result = {layout: {case: layout_run(folder, layout, ids, pixels) for case, folder in folders.items()}
              for layout in LAYOUTS}
    torch.save(result, f"{out}.{rank}")
    dist.barrier()  # no rank tears its gloo group down while the other is still in a collective
    dist.destroy_process_group()
