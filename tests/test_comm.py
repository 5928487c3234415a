"""Communication accounting: CommCounter against FSDP2 on 2 gloo processes and against hand-made
collectives of known size; the FSDP2 analytic expectation against what FSDP2 really issues."""

import datetime
import json
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from conftest import SMALL_MODEL
from mmfm.parallel.distributed import free_port
from mmfm.config import load_config
from mmfm.models import build_model, model_spec
from mmfm.parallel.comm import EXPECTATIONS, CommCounter, fsdp_expected_bytes

WORLD, MICRO = 2, 2

def fsdp_step(model, vocab: int, backward_counter: CommCounter) -> None:
    """One optimizer step's forward/backward (no optimizer): MICRO micro-steps, gradients synced on the last."""
    for i in range(MICRO):
        model.set_requires_gradient_sync(i == MICRO - 1)
        loss = model(torch.randint(4, vocab, (2, 16))).float().pow(2).mean()
        if i == MICRO - 1:
            with backward_counter:  # nested in the step's counter: both see the backward collectives
                loss.backward()
        else:
            loss.backward()

def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    from mmfm.parallel.data_parallel import apply_fsdp

    cfg = load_config(SMALL_MODEL).model
    containers = model_spec(cfg).block_containers(cfg)
    torch.manual_seed(rank)
    model = build_model(cfg)
    want = fsdp_expected_bytes(model, containers, WORLD, MICRO)
    kept = fsdp_expected_bytes(model, containers, WORLD, MICRO, reshard_after_forward=False)
    # The blocks' backward re-gather: what resharding after forward adds, per micro-step.
    result = {"want": want, "want_block_regather": (want["all_gather"] - kept["all_gather"]) // MICRO}
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp_shard",))
    apply_fsdp(model, mesh, containers)

    step, bwd = CommCounter(), CommCounter()
    with step:
        fsdp_step(model, cfg.language.vocab_size, bwd)
    result.update(step=step.bytes_by_kind(), step_calls=step.calls_by_kind(), bwd=bwd.bytes_by_kind())
    fsdp_step(model, cfg.language.vocab_size, CommCounter())  # outside: must not be counted
    dist.all_reduce(torch.ones(3))
    result["after_exit"] = step.bytes_by_kind()
    step.reset()
    result["after_reset"] = step.bytes_by_kind()
    with step:  # a second step, after reset: the same again
        fsdp_step(model, cfg.language.vocab_size, CommCounter())
    result["second_step"] = step.bytes_by_kind()

    # Hand-made collectives of known size (fp32): c10d ops, functional ones, P2P, and one in backward.
    sharded = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])  # (this scatters from rank 0: not counted)
    with CommCounter() as c:
        t = torch.ones(10)
        dist.send(t, 1) if rank == 0 else dist.recv(t, 0)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(3), 1 - rank),
                                       dist.P2POp(dist.irecv, torch.empty(3), 1 - rank)])
        for r in reqs:
            r.wait()
        dist.all_reduce(torch.ones(6))
        dist.broadcast(torch.ones(7), 0)
        dist.all_to_all_single(torch.empty(8), torch.ones(8))
        dist.all_gather_single(torch.empty(2 * 9), torch.ones(9))
        dist.reduce_scatter_single(torch.empty(5), torch.ones(2 * 5))
        x = torch.ones(4, requires_grad=True)
        fc.all_gather_single_autograd(x, 0, dist.group.WORLD).sum().backward()  # backward: reduce-scatter of 8
        fc.all_reduce(torch.ones(5), "sum", dist.group.WORLD).sum()
        fc.all_to_all_single(torch.ones(4), None, None, dist.group.WORLD).sum()
        fc.broadcast(torch.ones(3), 0, dist.group.WORLD).sum()
        (sharded.redistribute(mesh, [Replicate()]).to_local() * 2).sum()  # DTensor: a functional all-gather
    result["manual"] = c.bytes_by_kind()
    result["manual_calls"] = c.calls_by_kind()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # no rank tears its gloo group down while the other is still in a collective
    dist.destroy_process_group()

def test_comm_counter_matches_fsdp_analytic(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, got in enumerate(ranks):
        want = got["want"]
        assert got["step"] == want, f"rank {rank}: measured {got['step']} vs analytic {want}"  # ratio exactly 1
        # FSDP2 units: 1 vision block + 2 decoder layers gathered twice a micro-step, the root once;
        # one reduce-scatter per unit after the last micro-step.
        assert got["step_calls"] == {"all_gather": MICRO * (2 * 3 + 1), "reduce_scatter": 4}
        assert got["bwd"] == {"all_gather": got["want_block_regather"], "reduce_scatter": want["reduce_scatter"]}
        assert got["after_exit"] == want
        assert got["after_reset"] == {}
        assert got["second_step"] == want
        sends, recvs = ((10 + 3) * 4, 3 * 4) if rank == 0 else (3 * 4, (10 + 3) * 4)
        assert got["manual"] == {"send": sends, "recv": recvs, "all_reduce": (6 + 5) * 4, "broadcast": (7 + 3) * 4,
                                 "all_to_all": (8 + 4) * 4, "all_gather": (18 + 8 + 8) * 4,
                                 "reduce_scatter": (10 + 8) * 4}
        assert got["manual_calls"] == {"send": 2 - rank, "recv": 1 + rank, "all_reduce": 2, "broadcast": 2,
                                       "all_to_all": 2, "all_gather": 3, "reduce_scatter": 2}

def test_fsdp_expected_bytes_pads_dim0_per_parameter():
    model = nn.Module()
    model.pos = nn.Parameter(torch.empty(1, 5, device="meta"))  # root: dim 0 padded 1 -> 4
    model.blocks = nn.Sequential(nn.Linear(3, 6, device="meta"))  # weight 6x3 -> 8x3, bias 6 -> 8
    got = fsdp_expected_bytes(model, ("blocks",), dp_size=4, micro_steps=3, param_bytes=2, reduce_bytes=4)
    block, root = 8 * 3 + 8, 4 * 5
    assert got == {"all_gather": 3 * (2 * block + root) * 2, "reduce_scatter": (block + root) * 4}
    assert fsdp_expected_bytes(model, ("blocks",), dp_size=1, micro_steps=3) == {}
    assert EXPECTATIONS["fsdp"] is fsdp_expected_bytes


def test_tp_expectation_comes_from_each_part_and_is_none_where_a_part_has_none():
    """The TP plan's bytes are the sum of the parts' own tp_comm_bytes hooks (vit + projector + llama here:
    test_bench measures them against gloo); a clip / siglip tower models none, so the step is not modelled."""
    from mmfm.models.spec import part_spec

    cfg = load_config(SMALL_MODEL).model
    micro = [(2, 16, 2), (2, 16, 0)]
    total = EXPECTATIONS["tp"](cfg, micro)
    by_part = [part_spec(cfg, r).tp_comm_bytes(cfg, b, t, n, 4) for r in ("vision", "projector", "language")
               for b, t, n in micro]
    for kind in ("all_gather", "reduce_scatter"):
        assert total[kind] == sum(p.get(kind, 0) for p in by_part) > 0
    assert total["all_reduce"] > sum(p.get("all_reduce", 0) for p in by_part)  # + the replicated norms
    cfg.vision.kind, cfg.vision.stem = "siglip", "patch"
    assert EXPECTATIONS["tp"](cfg, micro) is None
