"""The tiny LLaVAs of tests/test_hf_vlm.py (CLIP tower + Llama, SigLIP tower + Qwen2) imported through
model.pretrained.vlm at tp=2, fsdp=2 and pp=2 (2 gloo processes, one spawn for every layout and case; the workers
are in vlm_parallel_runs.py): mmfm.parallel.parallelize builds this rank's part, each rank loads only its slices
(a pipeline stage only its parameters), and the fp32 logits on text + image input equal transformers'
LlavaForConditionalGeneration's. pp runs the project's pipeline schedule (GPipe, forward only: schedule.eval, as
the trainer's pipelined validation does); the logits come out of the last stage and are compared there.

Tolerance, max abs logit diff <= 1e-4 (fp32), as in test_hf_vlm.py: the same math in another order (eager vs
SDPA attention; under tp the row-parallel projections and the vocabulary-parallel embedding sum two partial
products and all-reduce them, FSDP only gathers the weights, pp only hands the hidden states on) moves logits of
magnitude ~1 by a few ulps per op, ~1e-6 over 3 tower layers, the projector and 2 decoder layers (the measured
values are printed). A rank that loaded another rank's slice, or a stage that kept its random initialization,
moves them by >1e-2 (all weights are random); the loaded tensors are also compared with the one-process import
exactly.
"""

import pytest
import torch
import torch.multiprocessing as mp

from mmfm.parallel.distributed import free_port
from test_hf_vlm import ATOL, CASES, batch, hf_logits, imported, save_llavas, vlm_config
from vlm_parallel_runs import LAYOUTS, WORLD, worker


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    """case -> (folder, transformers model), and every rank's results of vlm_parallel_runs.layout_run."""
    root = tmp_path_factory.mktemp("llava_parallel")
    llavas = save_llavas(root)
    out = str(root / "result.pt")
    ids, pixels = batch()
    mp.start_processes(worker, args=(free_port(), {c: str(f) for c, (f, _) in llavas.items()}, ids, pixels, out),
                       nprocs=WORLD, join=True, start_method="spawn")
    return llavas, [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_import_equals_transformers(parallel, case, layout):
    llavas, ranks = parallel
    folder, hf = llavas[case]
    full = {n: p.detach() for n, p in imported(vlm_config(folder)).named_parameters()}
    want = hf_logits(hf)
    split, held = set(), []
    for rank, result in enumerate(ranks):
        got = result[layout][case]
        for name, (local, dim) in got["params"].items():
            expected = full[name] if dim is None else full[name].chunk(WORLD, dim)[rank]
            assert torch.equal(local, expected), f"rank {rank}: {name}"
            if dim is not None:
                split.add(name)
        held.append(set(got["params"]))
        if got["logits"] is None:
            assert layout == "pp" and got["stages"] == [0]
            continue
        diff = (got["logits"] - want).abs().max().item()
        print(f"{case} {layout}=2 rank {rank}: max abs logit diff vs transformers {diff:.2e}")
        assert diff <= ATOL
    if layout == "tp":  # each rank holds its slices: the tower's, projector's and decoder's projections split
        assert {"vision.blocks.0.attn.wq.weight", "projector.fc1.weight", "language.layers.0.attention.wq.weight",
                "language.output.weight"} <= split
        assert all(h == set(full) for h in held)
    elif layout == "fsdp":
        assert split == set(full)  # every parameter sharded
    else:  # each stage holds (and loaded) only its own parameters, the two together the whole model
        assert not split and all(h < set(full) for h in held) and held[0] | held[1] == set(full)
        assert not held[0] & held[1]
        assert {"vision.patch_embed.weight", "projector.fc2.weight", "language.tok_embeddings.weight",
                "language.layers.0.attention.wq.weight"} <= held[0]
        assert {"language.layers.1.attention.wq.weight", "language.norm.weight", "language.output.weight"} <= held[1]
        assert [r[layout][case]["logits"] is None for r in ranks] == [True, False]
