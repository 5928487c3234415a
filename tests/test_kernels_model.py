"""The kernels inside the model (mmfm.kernels.apply), in Triton's CPU interpreter (tests/conftest.py sets it).

Tolerances: training with kernels=triton vs kernels=torch, fp32, 3 AdamW steps: losses rtol 1e-5, grad norms
rtol 1e-4, parameters atol 1e-4. The kernels compute in fp32 like the references, but reduce in another
order (RMSNorm's row sums, the chunked loss's per-chunk weight-gradient GEMMs), which moves results by a
few fp32 ulps (~1e-7 relative) per op. AdamW's first steps divide each gradient element by its own
magnitude, so an element whose gradient is near zero can turn that into a few percent of lr = 1e-3 (2.3e-5
observed), hence 1e-4 on parameters as in the parallel equivalence tests. A wrong kernel (a dropped
gradient term, a mis-rotated half) moves the loss by > 1e-3.
"""

import pytest
import torch
from devices import DEVICE

from mmfm.config import ConfigError, validate
from mmfm.kernels.apply import (FusedLinearCrossEntropy, grouped_mm_runs, PackedCoreAttention, TritonRMSNorm, TritonRotary,
                                TritonSiluMul, apply_kernels, resolve_kernels)
from mmfm.kernels.attention import available_backends
from mmfm.models import build_model
from mmfm.models.init import init_parameters
from mmfm.train.trainer import Trainer

pytest.importorskip("triton")

TINY = ["train.max_steps=3", "train.schedule.warmup_steps=1", "data.batch_size=4",
        "logger.log_every=1"]


def test_training_with_triton_kernels_matches_torch(make_cfg, tmp_path):
    ref = Trainer(make_cfg(*TINY, "kernels=torch"), tmp_path / "torch")
    fused = Trainer(make_cfg(*TINY, "kernels=triton"), tmp_path / "triton")
    # attention=auto: SDPA off CUDA; on CUDA the best backend there, chosen per call
    attention = "auto" if fused.device.type == "cuda" else "sdpa"
    experts = "grouped_mm" if grouped_mm_runs(fused.device) else "loop"
    assert fused.parts.kernels == {"rms_norm": "triton", "rotary": "triton", "swiglu": "triton",
                                   "linear_cross_entropy": "triton", "attention": attention, "experts": experts}
    lm = fused.model.language
    assert type(lm.norm) is TritonRMSNorm and type(lm.cross_entropy) is FusedLinearCrossEntropy
    assert type(lm.layers["0"].attention.rotary) is TritonRotary
    assert type(lm.layers["0"].feed_forward.act) is TritonSiluMul
    assert fused.loss_in_model and not ref.loss_in_model
    a, b = ref.fit(), fused.fit()
    for step in a["losses"]:
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=1e-5)
        assert b["grad_norms"][step] == pytest.approx(a["grad_norms"][step], rel=1e-4)
    assert a["losses"][3] < a["losses"][1]  # it trained
    ref_params = dict(ref.model.named_parameters())  # same names: checkpoints are interchangeable
    diffs = {name: (p - ref_params[name]).abs().max().item() for name, p in fused.model.named_parameters()}
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_chunked_loss_trains_like_logits_loss(make_cfg, tmp_path):
    ref = Trainer(make_cfg(*TINY, "kernels=torch"), tmp_path / "torch").fit()
    chunked = Trainer(make_cfg(*TINY, "kernels=torch", "kernels.linear_cross_entropy=chunked"), tmp_path / "c").fit()
    for step in ref["losses"]:
        assert chunked["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5)


def _model(make_cfg, choices):
    model = build_model(make_cfg().model, "meta")
    apply_kernels(model, choices)
    model.to_empty(device=DEVICE)
    init_parameters(model, 0)
    return model


TORCH = {"rms_norm": "torch", "rotary": "torch", "swiglu": "torch", "linear_cross_entropy": "torch",
         "attention": "sdpa", "experts": "loop"}
TRITON = {"rms_norm": "triton", "rotary": "triton", "swiglu": "triton", "linear_cross_entropy": "triton",
          "attention": "sdpa", "experts": "loop"}


def _documents(vocab, lengths, generator):
    return [torch.randint(4, vocab, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("choices", [TORCH, TRITON], ids=["torch", "triton"])
def test_packed_documents_equal_documents_run_alone(make_cfg, choices):
    """Two rows, each packing documents (positions restart per document): every document's logits and
    summed loss equal those of the document run by itself."""
    model = _model(make_cfg, choices).eval()
    vocab = model.cfg.language.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [[t.to(DEVICE) for t in _documents(vocab, lengths, g)] for lengths in ([7, 12, 5], [9, 15])]
    length = 24
    ids = torch.zeros(2, length, dtype=torch.long, device=DEVICE)
    doc_ids = torch.full((2, length), -1, dtype=torch.long, device=DEVICE)  # -1: padding, a document of its own
    positions = torch.zeros(2, length, dtype=torch.long, device=DEVICE)
    for r, docs in enumerate(rows):
        start = 0
        for d, tokens in enumerate(docs):
            n = len(tokens)
            ids[r, start:start + n], doc_ids[r, start:start + n] = tokens, d
            positions[r, start:start + n] = torch.arange(n, device=DEVICE)
            start += n
        positions[r, start:] = torch.arange(length - start, device=DEVICE)
    with torch.no_grad():
        packed = model(ids, positions=positions, document_ids=doc_ids)
        for r, docs in enumerate(rows):
            start = 0
            for tokens in docs:
                alone = model(tokens[None])[0]
                torch.testing.assert_close(packed[r, start:start + len(tokens)], alone, rtol=1e-5, atol=1e-5)
                start += len(tokens)
    # the summed loss through the model's loss module (fused under TRITON) equals the logits' loss
    targets = torch.where(doc_ids >= 0, ids.roll(-1, 1), -100)
    loss = model(ids, positions=positions, document_ids=doc_ids, targets=targets)
    expected = torch.nn.functional.cross_entropy(packed.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", [b for b in available_backends(DEVICE, torch.float32, training=False) if b != "sdpa"])
def test_packed_attention_core_backends_in_the_model(make_cfg, backend):
    """The decoder's core replaced by each backend usable here (flex on CPU, forward only) gives the
    reference model's logits (attention=sdpa keeps the model's own core, which masks documents itself)."""
    ref = _model(make_cfg, TORCH).eval()
    swapped = _model(make_cfg, {**TORCH, "attention": backend}).eval()
    assert type(swapped.language.layers["0"].attention.core) is PackedCoreAttention
    assert type(swapped.vision.blocks["0"].attn.core) is not PackedCoreAttention  # the ViT is bidirectional
    ids = torch.randint(4, 100, (2, 16), device=DEVICE)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids, document_ids=doc_ids), ref(ids, document_ids=doc_ids),
                                   rtol=1e-5, atol=1e-5)


def test_auto_keeps_the_reference_on_cpu_and_layouts_rule_kernels_out(make_cfg, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what a CPU test run has; explicit for MMFM_TEST_DEVICE=cuda
    cfg = make_cfg()
    # but the experts' torch op, which runs on CPU
    assert resolve_kernels(cfg.kernels, torch.device("cpu")) == {**TORCH, "experts": "grouped_mm"}
    triton_cfg = make_cfg("kernels=triton").kernels
    under_tp = resolve_kernels(make_cfg("kernels=triton", "kernels.rms_norm=auto",
                                        "kernels.linear_cross_entropy=auto").kernels, torch.device("cpu"), tp=2)
    assert under_tp["rms_norm"] == "torch" and under_tp["linear_cross_entropy"] == "torch"
    assert under_tp["swiglu"] == "triton" and under_tp["rotary"] == "triton"
    with pytest.raises(ValueError, match=r"kernels.rms_norm=triton cannot run under tensor parallelism.*=auto"):
        resolve_kernels(triton_cfg, torch.device("cpu"), tp=2)
    with pytest.raises(ValueError, match=r"kernels.linear_cross_entropy=triton cannot run under tensor or pipeline"):
        resolve_kernels(triton_cfg, torch.device("cpu"), pp=2)


def test_config_errors_name_the_field_and_fix(make_cfg, monkeypatch):
    with pytest.raises(ConfigError, match=r"kernels.swiglu='fast' is unknown; use one of"):
        validate(make_cfg("kernels.swiglu=fast"))
    with pytest.raises(ConfigError, match=r"kernels.attention=flash cannot train on cpu"):
        validate(make_cfg("kernels.attention=flash", "device=cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU run outside the tests: no kernel can run
    with pytest.raises(ConfigError, match=r"kernels.rms_norm=triton needs Triton and a CUDA device.*=auto or torch"):
        validate(make_cfg("kernels=triton", "device=cpu"))
