"""Context parallelism (cp=2 on gloo processes) against one process: attention alone and the whole VLM.

One spawn serves all tests: each worker runs the checks and saves what it computed; the assertions
compare with the single-process references here. Tolerance (fp32): the cp ranks compute the same sums
split into chunks (and the gradients summed over 2 ranks), so results agree to rounding, not bit for bit:
gradients differ by at most ~3e-6 of their tensor's largest entry. The loss is the mean over all tokens,
so gradients are O(1) and differ by < 1e-7 (atol 1e-6); a plain sum over the 64 tokens scales them,
and the differences (up to 5e-6), by 64.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from conftest import SMALL_MODEL
from mmfm.config import load_config
from mmfm.models import build_model
from mmfm.parallel.activation_checkpoint import apply_activation_checkpointing
from mmfm.parallel.context_parallel import ContextParallelAttention, apply_context_parallel, shard_sequence
from mmfm.parallel.distributed import free_port

CP = 2
B, H, T, D = 2, 4, 16, 8


def qkv_and_grad():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(4)]  # q, k, v, upstream gradient


def vlm_batch(cfg):
    """Two rows of 32 tokens with one image each (the first crosses the chunk boundary at 16)."""
    g = torch.Generator().manual_seed(1)
    img, tpi = cfg.image_token_id, (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    text = lambda n: torch.randint(4, cfg.language.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows = [[1] + [img] * tpi + text(15), [1] + text(8) + [img] * tpi + text(7)]
    input_ids = torch.tensor(rows)
    pixels = torch.randn(2, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    targets = torch.randint(0, cfg.language.vocab_size, input_ids.shape, generator=g)
    return input_ids, pixels, targets


def model_cfg():
    return load_config(SMALL_MODEL).model


def attention_check(mesh) -> dict:
    q, k, v, gout = qkv_and_grad()
    for t in (q, k, v):
        t.requires_grad_(True)
    core = ContextParallelAttention(mesh.get_group())
    out = core(*(shard_sequence(t, mesh, dim=2) for t in (q, k, v)))
    (out * shard_sequence(gout, mesh, dim=2)).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def cp_model(cfg, mesh, wrapped: bool):
    model = build_model(cfg, seed=0)
    if wrapped:  # layers behind checkpoint wrappers: the hooks must not depend on the layer class
        apply_activation_checkpointing(model, ("vision.blocks", "language.layers"), "full")
    return apply_context_parallel(model, mesh)


def model_check(mesh, wrapped: bool = False) -> dict:
    cfg = model_cfg()
    model = cp_model(cfg, mesh, wrapped)
    input_ids, pixels, targets = vlm_batch(cfg)
    # wrapped: also pass positions (per-position [B, T, D/2] rotary angles), the same as the default
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids) if wrapped else None
    logits = model(input_ids, pixels, positions)
    # This chunk's share of the mean over all B x T tokens (as the trainer normalizes by the global count).
    loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(targets, mesh).flatten(), reduction="sum")
    loss = loss / targets.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_group())
    grads = {}
    for name, p in model.named_parameters():  # each rank holds its chunk's partial sums
        dist.all_reduce(p.grad, group=mesh.get_group())
        grads[name.replace("_checkpoint_wrapped_module.", "")] = p.grad
    if wrapped:
        return {"logits": logits.detach(), "loss": total.item(), "grads": grads}
    # Both ranks raise before any collective, so nothing hangs. 31 tokens still hold both images.
    mask = torch.ones(2, 1, 16, 32, dtype=torch.bool)
    calls = {"odd": lambda: model(input_ids[:, :31], pixels), "mask": lambda: model(input_ids, pixels, attn_mask=mask)}
    errors = {}
    for key, call in calls.items():
        try:
            call()
        except ValueError as e:
            errors[key] = str(e)
    return {"logits": logits.detach(), "loss": total.item(), "grads": grads, "errors": errors}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CP, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",))
    result = {"attention": attention_check(mesh), "model": model_check(mesh), "wrapped": model_check(mesh, True)}
    torch.save(result, f"{out}.{rank}")
    dist.barrier()  # no rank tears its gloo group down while the other is still in a collective
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cp") / "result.pt")
    mp.start_processes(worker, args=(free_port(), out), nprocs=CP, join=True, start_method="spawn")
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(CP)]


def test_attention_matches_full_sequence(ranks):
    q, k, v, gout = qkv_and_grad()
    for t in (q, k, v):
        t.requires_grad_(True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (want * gout).sum().backward()
    got = [r["attention"] for r in ranks]
    torch.testing.assert_close(torch.cat([g["out"] for g in got], dim=2), want.detach(), rtol=0, atol=1e-6)
    tc = T // CP
    for rank, g in enumerate(got):
        mine = slice(rank * tc, (rank + 1) * tc)
        for name, full in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            # backward of the all-gather reduce-scatters: a rank's k/v chunk gets its complete gradient
            torch.testing.assert_close(g[name][:, :, mine], full[:, :, mine], rtol=0, atol=1e-6, msg=name)
            others = torch.ones(T, dtype=torch.bool)
            others[mine] = False
            assert g[name][:, :, others].abs().max() == 0, name


@pytest.mark.parametrize("variant", ["model", "wrapped"], ids=["plain", "ac+positions"])
def test_model_loss_and_grads_match_one_process(ranks, variant):
    cfg = model_cfg()
    model = build_model(cfg, seed=0)
    input_ids, pixels, targets = vlm_batch(cfg)
    logits = model(input_ids, pixels)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    got = [r[variant] for r in ranks]
    torch.testing.assert_close(torch.cat([g["logits"] for g in got], dim=1), logits.detach(), rtol=0, atol=1e-5)
    for g in got:
        assert g["loss"] == pytest.approx(loss.item(), rel=1e-5)
    want = dict(model.named_parameters())
    assert got[0]["grads"].keys() == want.keys()
    for name, p in want.items():
        torch.testing.assert_close(got[0]["grads"][name], p.grad, rtol=0, atol=1e-6, msg=name)


def test_unsupported_inputs_raise(ranks):
    for r in ranks:
        errors = r["model"]["errors"]
        assert "sequence length 31 must be divisible by the context-parallel size 2" in errors["odd"]
        assert "attention masks" in errors["mask"]
