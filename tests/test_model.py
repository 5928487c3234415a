import dataclasses

import pytest
import torch

from mmfm.config import load_config
from mmfm.config.schema import ModelConfig
from mmfm.models import build_model
from mmfm.models import model_spec
from mmfm.models.llama.counts import flops_per_token
from mmfm.models.generate import generate
from mmfm.models.init import init_parameters

IMG = 3  # <image> token id


def tiny(**language) -> ModelConfig:
    cfg = load_config(["model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.num_layers=1",
                       "model.vision.patch_size=8", "model.vision.stem=patch",
                       "model.language.hidden_size=32", "model.language.num_layers=2",
                       "model.language.intermediate_size=64", "model.language.vocab_size=64"]).model
    cfg.language = dataclasses.replace(cfg.language, **language)
    return cfg


def make(cfg: ModelConfig, seed=0):
    return build_model(cfg, seed=seed)


def sequence(num_images: int, tokens_per_image: int, text=(10, 11, 12, 13)) -> list[int]:
    return [1] + [IMG] * (num_images * tokens_per_image) + list(text)


@pytest.mark.parametrize("tied,stem", [(True, "patch"), (False, "patch"), (True, "conv")])
def test_param_count_matches_modules(tied, stem):
    cfg = tiny(tie_embeddings=tied)
    cfg.vision.stem = stem
    model = make(cfg)
    assert sum(p.numel() for p in model.parameters()) == model_spec(cfg).num_params(cfg)


def test_sincos_position_init_is_maes_2d_table():
    """position_init=sincos: patch (row r, column c) starts at [sin r w, cos r w, sin c w, cos c w] for the dim / 4
    frequencies w = 1 / 10000 ** (i / (dim / 4)); here dim 32, so 8 frequencies a block."""
    cfg = tiny()
    cfg.vision.position_init = "sincos"
    table = make(cfg).vision.pos_embed.detach()[0]  # [16 patches (4 x 4), 32]
    freqs = torch.tensor([10000 ** (-i / 8) for i in range(8)], dtype=torch.float64)
    for row, col in [(0, 0), (1, 2), (3, 3), (2, 0)]:
        want = torch.cat([(row * freqs).sin(), (row * freqs).cos(), (col * freqs).sin(), (col * freqs).cos()])
        torch.testing.assert_close(table[row * 4 + col], want.float())
    assert table[1 * 4 + 2, 0] == pytest.approx(0.8414710)  # sin(1): the second row's first channel
    normal = make(tiny()).vision.pos_embed.detach()
    assert 0.01 < normal.std() < 0.03  # the default stays a draw at the init std (0.02)


def test_7b_layout_on_meta_device_costs_no_memory():
    cfg = load_config(["model=vlm_7b"]).model
    model = build_model(cfg, "meta")
    total = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert total == model_spec(cfg).num_params(cfg)
    assert 6.8e9 < total < 7.4e9  # Llama-2-7B decoder + ViT-L/14 + projector
    # 6N rule of thumb within 20% once attention is included at 4k context
    fpt = flops_per_token(cfg, 4096)
    assert 6 * 6.5e9 < fpt < 1.2 * 6 * 7e9


def test_meta_build_then_materialize_matches_seeded_build():
    cfg = tiny()
    a = make(cfg, seed=3)
    b = build_model(cfg, "meta")
    b.to_empty(device="cpu")
    torch.manual_seed(99)  # initialization does not depend on the global RNG
    init_parameters(b, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.allclose(a.language.rope_cos, b.language.rope_cos)
    c = make(cfg, seed=4)
    assert not torch.equal(a.language.layers["0"].attention.wq.weight, c.language.layers["0"].attention.wq.weight)
    # the same rules as before per parameter kind
    assert torch.equal(a.language.norm.weight, torch.ones_like(a.language.norm.weight))
    assert a.vision.blocks["0"].attn.wq.bias.abs().sum() == 0
    assert a.language.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_training_flops_adds_images():
    cfg = tiny()
    spec = model_spec(cfg)
    base = spec.training_flops(cfg, 100, 50, 0)
    assert spec.training_flops(cfg, 100, 50, 2) == pytest.approx(base + 2 * spec.flops_per_image(cfg))


def test_logits_shape_and_causality():
    cfg = tiny()
    model = make(cfg).eval()
    ids = torch.tensor([sequence(1, 16)])
    img = torch.randn(1, 3, 32, 32)
    logits = model(ids, img)
    assert logits.shape == (1, ids.shape[1], 64)
    changed = ids.clone()
    changed[0, -1] = 20
    later = model(changed, img)
    assert torch.equal(logits[0, :-1], later[0, :-1])
    assert not torch.allclose(logits[0, -1], later[0, -1])


def test_image_features_are_spliced_at_placeholders_in_order():
    cfg = tiny()
    model = make(cfg).eval()
    ids = torch.tensor([sequence(2, 16), [1] + [10] * 33 + [11, 12, 13]])  # two images, then text only
    imgs = torch.randn(2, 3, 32, 32)
    h = model.embed(ids, imgs)
    feats = model.image_features(imgs)
    assert torch.allclose(h[0, 1:17], feats[0]) and torch.allclose(h[0, 17:33], feats[1])
    assert torch.equal(h[1], model.language.embed(ids[1:])[0])
    swapped = model.embed(ids, imgs.flip(0))
    assert torch.allclose(swapped[0, 1:17], feats[1])


def test_text_only_batch_still_runs_vision_tower_with_zero_gradient():
    cfg = tiny()
    model = make(cfg)
    ids = torch.tensor([[1, 10, 11, 12]])
    model(ids, None).sum().backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert torch.count_nonzero(model.language.tok_embeddings.weight.grad) > 0


def test_placeholder_count_mismatch_is_an_error():
    model = make(tiny())
    with pytest.raises(ValueError, match="16 image placeholder tokens but 2 images"):
        model(torch.tensor([sequence(1, 16)]), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_shapes(kv_heads):
    model = make(tiny(num_heads=4, num_kv_heads=kv_heads))
    assert model.language.layers["0"].attention.wk.weight.shape == (kv_heads * 8, 32)
    assert model(torch.tensor([[1, 10, 11]])).shape == (1, 3, 64)


def greedy_without_cache(model, prompt, image, steps):
    ids, out = torch.tensor([prompt]), []
    for _ in range(steps):
        logits = model(ids, image)[0, -1]
        logits[IMG] = float("-inf")  # the placeholder is never generated
        token = logits.argmax().item()
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


def test_kv_cache_generation_matches_full_recompute_with_left_padding():
    cfg = tiny()
    model = make(cfg, seed=1).eval()
    with torch.no_grad():  # larger weights so that greedy outputs vary from step to step
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim == 2 else None
    prompts = [sequence(1, 16, (10, 11, 12, 13, 14)), sequence(1, 16, (20,))]
    imgs = torch.randn(2, 3, 32, 32)
    got = generate(model, prompts, imgs, max_new_tokens=6, eos_id=-1, pad_id=0)
    want = [greedy_without_cache(model, p, imgs[i:i + 1], 6) for i, p in enumerate(prompts)]
    assert got == want
    assert len(set(want[0])) > 1


def test_sampling_is_seeded_and_stops_at_eos():
    model = make(tiny(), seed=2).eval()
    prompts, img = [sequence(1, 16)] * 3, torch.randn(3, 3, 32, 32)
    run = lambda: generate(model, prompts, img, 8, eos_id=5, pad_id=0, temperature=1.0, top_k=20,  # noqa: E731
                           generator=torch.Generator().manual_seed(7))
    first = run()
    assert first == run()
    assert all(5 not in out and len(out) <= 8 for out in first)
