"""The clip family (model.vision.kind=clip / siglip) against transformers' CLIPVisionModel, SiglipVisionModel and
LlavaForConditionalGeneration: tiny random towers in fp32, loaded through the state-dict adapter.

Tolerance (ATOL = 1e-4): both sides compute the same fp32 math in a different order (transformers' eager
attention against scaled_dot_product_attention, its LayerNorm and GELU calls against ours), so each op
differs by a few ulps; over 3 layers of 64-wide products on features up to ~13 that is a few 1e-6
(measured 1.2e-6 to 3.3e-6, printed by each test). The subtlest wrong layout, SigLIP with erf GELU instead of
tanh GELU, moves the features by 1.8e-3; a wrong name mapping (a swapped projection or norm), the class token
kept, post_layernorm applied or the wrong layer by >1e-2, since every weight here is random (transformers
initializes norms to one and biases to zero, which would hide them).
"""

import pytest
import torch
import torch.multiprocessing as mp
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          SiglipVisionConfig, SiglipVisionModel)

from mmfm.config import ConfigError, image_tokens, load_config, validate
from mmfm.config.schema import ModelConfig, VisionConfig
from mmfm.models import build_model, model_spec
from mmfm.models.clip.model import ClipVisionTower
from mmfm.models.clip.state_dict_adapter import (ADAPTERS, PREFIXES, UnexpectedTensors, UnsupportedConfig, adapter_for,
                                                 find_prefix)
from mmfm.models.spec import part_spec
from mmfm.parallel.dims import ParallelDims
from mmfm.parallel.distributed import free_port
from vision_tp_runs import TP, TP_CASES, tower_run, tp_case, tp_worker

ATOL = 1e-4
HF = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
TINY = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_tower(kind: str, **sizes):
    config_cls, model_cls = HF[kind]
    torch.manual_seed(0)  # transformers initializes from the global generator
    return randomize(model_cls(config_cls(**{**TINY, **sizes}, attn_implementation="eager")))


def pixels(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def tower_from_hf(hf_model, feature_layer=None) -> ClipVisionTower:
    """An mmfm tower with the weights of a transformers model (a vision model or a LLaVA)."""
    hf_config = hf_model.config.to_dict()
    adapter = adapter_for(hf_config)
    v = VisionConfig(**adapter.config_from_hf(hf_config, feature_layer))
    tower = ClipVisionTower(v)
    tower.load_state_dict(adapter.from_hf(hf_model.state_dict(), v), strict=True)
    return tower.eval()


def tiny_vlm(kind: str, *more: str) -> ModelConfig:
    return load_config([f"model.vision.kind={kind}", "model.vision.stem=patch", "model.vision.image_size=32",
                        "model.vision.patch_size=8", "model.vision.hidden_size=32", "model.vision.num_layers=2",
                        "model.language.hidden_size=32", "model.language.num_layers=1",
                        "model.language.intermediate_size=64", "model.language.vocab_size=64", *more]).model


# ---------------------------------------------------------------- equal to transformers


@pytest.mark.parametrize("kind,layer", [("siglip", -1), ("siglip", -2), ("siglip", 1), ("clip", -2), ("clip", -1),
                                        ("clip", 2)])
def test_features_equal_transformers_hidden_states(kind, layer):
    hf = hf_tower(kind)
    tower = tower_from_hf(hf, layer)
    x = pixels()
    with torch.no_grad():
        want = hf(x, output_hidden_states=True).hidden_states[layer]
        got = tower(x)
    if kind == "clip":
        want = want[:, 1:]  # LLaVA's "default" strategy: the class token dropped
    diff = (got - want).abs().max().item()
    print(f"{kind} hidden_states[{layer}]: max abs diff {diff:.2e} (features up to {want.abs().max():.1f})")
    assert got.shape == want.shape == (2, tower.num_patches, 64)
    assert diff <= ATOL
    # what the tower leaves out is what transformers' features do not depend on
    assert len(tower.blocks) == layer % 4
    cfg = ModelConfig(vision=tower.cfg)
    assert sum(p.numel() for p in tower.parameters()) == part_spec(cfg, "vision").num_params(cfg)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_size_off_the_patch_grid_drops_the_edge_as_transformers(kind):
    """SigLIP-so400m's 384 px in 14 px patches: 27 x 27 patches, the last 6 px rows and columns in none. Here 36 px
    in 8 px patches, 4 px dropped: the same features as transformers'; below one patch is refused."""
    cfg = tiny_vlm(kind, "model.vision.image_size=36")
    assert cfg.vision.image_size == 36
    model_spec(cfg).validate(cfg)
    tower = tower_from_hf(hf_tower(kind, image_size=36), -1)
    x = pixels(2, 36)
    with torch.no_grad():
        want = hf_tower(kind, image_size=36)(x, output_hidden_states=True).hidden_states[-1][:, int(kind == "clip"):]
        got = tower(x)
    assert got.shape == want.shape == (2, 16, 64) and (got - want).abs().max().item() <= ATOL
    cfg.vision.image_size = 7
    with pytest.raises(ConfigError, match="image_size=7 is smaller than model.vision.patch_size=8: no patch fits"):
        model_spec(cfg).validate(cfg)


@pytest.mark.parametrize("kind,strategy,layer", [("clip", "default", -2), ("siglip", "full", -1)])
def test_llava_image_features_equal_mmfm(kind, strategy, layer):
    """LlavaModel.get_image_features (tower, feature layer and strategy, projector) = the VLM's image_features."""
    config_cls, _ = HF[kind]
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2)
    torch.manual_seed(0)
    llava = randomize(LlavaForConditionalGeneration(LlavaConfig(
        vision_config=config_cls(**TINY), text_config=text, image_token_index=5, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy)))
    x = pixels()
    with torch.no_grad():
        want = torch.stack(llava.model.get_image_features(x).pooler_output)
    state = llava.state_dict()
    assert find_prefix(state) == "model.vision_tower."
    vision = adapter_for(llava.config.to_dict()).config_from_hf(llava.config.to_dict())
    assert vision["feature_layer"] == layer
    cfg = tiny_vlm(kind)
    cfg.vision = VisionConfig(**vision)
    model = build_model(cfg).eval()
    model.vision = tower_from_hf(llava)
    projector = {f"fc{i}.{p}": state[f"model.multi_modal_projector.linear_{i}.{p}"] for i in (1, 2)
                 for p in ("weight", "bias")}
    model.projector.load_state_dict(projector, strict=True)
    with torch.no_grad():
        got = model.image_features(x)
    diff = (got - want).abs().max().item()
    print(f"llava with {kind} ({strategy}, layer {layer}): max abs diff {diff:.2e}")
    assert got.shape == want.shape == (2, 16, 32) and diff <= ATOL


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("kind,hf_config,hf_extra", [
    # CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): all but post_layernorm (2 x 1024)
    ("clip", dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16), 2 * 1024),
    # SigLIP so400m/14 at 384 px: all but post_layernorm and the attention-pooling head
    ("siglip", dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                    num_attention_heads=16), None),
])
def test_counts_at_real_shapes_equal_transformers(kind, hf_config, hf_extra):
    config_cls, model_cls = HF[kind]
    with torch.device("meta"):
        hf = model_cls(config_cls(**hf_config))
    total = sum(p.numel() for p in hf.parameters())
    if hf_extra is None:
        hf_extra = sum(p.numel() for n, p in hf.named_parameters() if n.startswith(("post_layernorm.", "head.")))
    fields = ADAPTERS[kind].config_from_hf(hf.config.to_dict())
    cfg = ModelConfig(vision=VisionConfig(**fields))
    spec = part_spec(cfg, "vision")
    assert spec.num_params(cfg) == total - hf_extra
    layer = sum(p.numel() for n, p in hf.named_parameters() if n.startswith("encoder.layers.0."))
    cfg.vision.feature_layer = -2  # LLaVA: one layer less
    smaller = spec.num_params(cfg)
    assert total - hf_extra - smaller == layer
    with torch.device("meta"):
        assert sum(p.numel() for p in ClipVisionTower(cfg.vision).parameters()) == smaller
    # 6 FLOPs per parameter-position, a little more with attention
    positions = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    assert 6 * smaller * positions * 0.95 < spec.flops_per_image(cfg) < 6 * smaller * positions * 1.4


def test_llava15_preset_counts_what_transformers_builds_less_the_unused_tail():
    """transformers' LlavaForConditionalGeneration at llava-hf/llava-1.5-7b-hf's config holds 7,063,427,072
    parameters (counted on the meta device); mmfm builds all but CLIP's last layer and post_layernorm."""
    cfg = load_config(["model=llava15_7b", "data.seq_len=2048"])
    validate(cfg)
    model = build_model(cfg.model, "meta")
    clip_last_layer = 4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + 2 * 1024 * 4096 + 4096 + 1024
    want = 7_063_427_072 - clip_last_layer - 2 * 1024
    assert sum(p.numel() for p in model.parameters()) == model_spec(cfg.model).num_params(cfg.model) == want
    assert model.tokens_per_image == image_tokens(cfg) == 576 and len(model.vision.blocks) == 23
    # 577 positions (576 patches + the class token) split by no tp: the plan keeps the sequence whole
    ParallelDims(tp=8).validate(cfg.model)


@pytest.mark.parametrize("kind,layer", [("clip", -2), ("siglip", -1), ("siglip", 1)])
def test_param_count_matches_modules_and_every_parameter_learns(kind, layer):
    cfg = tiny_vlm(kind, f"model.vision.feature_layer={layer}")
    model_spec(cfg).validate(cfg)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == model_spec(cfg).num_params(cfg)
    ids = torch.tensor([[1] + [cfg.image_token_id] * 16 + [10, 11, 12]])
    logits = model(ids, pixels(1))
    assert logits.shape == (1, 20, 64)
    logits.float().pow(2).mean().backward()
    no_grad = [n for n, p in model.vision.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


# ---------------------------------------------------------------- configs and names


def test_config_defaults_are_transformers_class_defaults():
    for kind, (config_cls, _) in HF.items():
        d = config_cls().to_dict()
        assert {k: d[k] for k in ADAPTERS[kind].defaults} == ADAPTERS[kind].defaults


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_config_round_trip_and_defaults_filled(kind):
    v = VisionConfig(**ADAPTERS[kind].config_from_hf(HF[kind][0](**TINY).to_dict(), feature_layer=-2))
    assert (v.kind, v.hidden_size, v.intermediate_size, v.num_layers, v.feature_layer) == (kind, 64, 96, 3, -2)
    assert v.act == {"clip": "quick_gelu", "siglip": "gelu_tanh"}[kind]
    back = ADAPTERS[kind].config_from_hf(ADAPTERS[kind].config_to_hf(v), feature_layer=-2)
    assert VisionConfig(**back) == v
    # a config.json may omit what equals the class default (transformers' to_diff_dict)
    sparse = {"model_type": ADAPTERS[kind].model_type, "hidden_size": 64, "num_attention_heads": 4}
    assert VisionConfig(**ADAPTERS[kind].config_from_hf(sparse)).num_layers == 12


def test_llava_config_sets_feature_layer_and_refuses_what_mmfm_cannot_give():
    llava = LlavaConfig(vision_config=CLIPVisionConfig(**TINY)).to_diff_dict()
    assert ADAPTERS["clip"].config_from_hf(llava)["feature_layer"] == -2  # LLaVA's default
    siglip = LlavaConfig(vision_config=SiglipVisionConfig(**TINY)).to_diff_dict()
    bad = [
        (siglip, "vision_feature_select_strategy='default' with a siglip tower"),  # LLaVA would drop a patch
        ({**siglip, "vision_feature_select_strategy": "full", "vision_feature_layer": [-2, -5]},
         "vision_feature_layer=[-2, -5]: mmfm takes one layer's features"),
        ({**llava, "vision_feature_select_strategy": "full"}, "vision_feature_select_strategy='full' with a clip"),
        ({"model_type": "siglip2_vision_model"}, "SigLIP2's NaFlex variant"),
        ({"model_type": "clip_vision_model", "hidden_act": "relu"}, "hidden_act='relu' is not supported"),
        ({"model_type": "clip_vision_model", "hidden_size": "64"}, "hidden_size='64' is not an int"),
    ]
    for hf, message in bad:
        with pytest.raises(UnsupportedConfig, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
            adapter_for(hf).config_from_hf(hf)
        assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedConfig, match="model_type='llama' is no CLIP or SigLIP vision tower"):
        adapter_for({"model_type": "llama"})


def test_names_under_every_container_and_strictness():
    v = VisionConfig(**ADAPTERS["clip"].config_from_hf(CLIPVisionConfig(**TINY).to_dict(), feature_layer=-2))
    theirs = list(hf_tower("clip").state_dict())
    assert "post_layernorm.weight" in theirs and "encoder.layers.2.mlp.fc2.bias" in theirs
    adapter = ADAPTERS["clip"]
    for prefix in PREFIXES:
        state = {prefix + n: torch.zeros(1) for n in theirs} | {"language_model.embed_tokens.weight": torch.zeros(1)}
        assert find_prefix(state) == prefix
        ours = adapter.from_hf(state, v)
        assert set(ours) == {n for n, _ in ClipVisionTower(v).named_parameters()}
        assert set(adapter.to_hf(ours, v, prefix)) == set(adapter.names(v, prefix).values())
    state = dict.fromkeys(theirs, torch.zeros(1))
    with pytest.raises(UnexpectedTensors, match="1 tensors of the model.vision.kind=clip tower are missing, e.g. "
                                                "'embeddings.class_embedding'"):
        adapter.from_hf({k: t for k, t in state.items() if k != "embeddings.class_embedding"}, v)
    with pytest.raises(UnexpectedTensors, match="2 tensors of the checkpoint's tower have no place.*layers.3.mlp"):
        adapter.from_hf({**state, "encoder.layers.3.mlp.fc1.bias": 0, "encoder.layers.3.mlp.fc2.bias": 0}, v)
    with pytest.raises(UnexpectedTensors, match="no CLIP / SigLIP vision tower found"):
        find_prefix(["model.embed_tokens.weight"])


BAD = [
    (["model.vision.kind=clip", "model.vision.feature_layer=0"],
     "model.vision.feature_layer=0 selects no layer's output of model.vision.num_layers=2; use 1..2 or -1..-2"),
    (["model.vision.kind=siglip", "model.vision.feature_layer=-3"], "model.vision.feature_layer=-3 selects no layer"),
    (["model.vision.kind=siglip", "model.vision.feature_layer=3"], "model.vision.feature_layer=3 selects no layer"),
    (["model.vision.kind=clip", "model.vision.act=relu"], "model.vision.act='relu' is unknown; use one of"),
    (["model.vision.kind=clip", "model.vision.stem=conv"], "model.vision.stem='conv' is only for kind=vit"),
    (["model.vision.kind=siglip", "model.vision.intermediate_size=-1"], "model.vision.intermediate_size=-1 must be"),
    (["model.vision.kind=vit", "model.vision.feature_layer=-2"], "not supported by model.vision.kind=vit"),
    (["model.vision.kind=vit", "model.vision.act=quick_gelu"], "model.vision.act='quick_gelu' is not supported"),
    (["model.vision.kind=clip", "model.vision.position_init=sincos"], "model.vision.position_init='sincos' is only"),
    (["model.vision.kind=vit", "model.vision.position_init=rope"], "model.vision.position_init='rope' is unknown"),
    (["model.vision.kind=vit", "model.vision.position_init=sincos", "model.vision.hidden_size=34",
      "model.vision.num_heads=2"], "model.vision.position_init=sincos needs model.vision.hidden_size divisible by 4"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_vision_configs_fail_in_one_line(overrides, message):
    cfg = tiny_vlm("vit", *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        model_spec(cfg).validate(cfg)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- tensor parallelism (tp=2, gloo)

def test_tensor_parallel_tower_equals_one_process(tmp_path):
    """tp=2 against one process, fp32: the row-parallel projections sum two partial products where one process
    sums one, so results agree to rounding (measured below 1e-6; ATOL 1e-5), not bit for bit."""
    out = str(tmp_path / "tp.pt")
    mp.start_processes(tp_worker, args=(free_port(), out), nprocs=TP, join=True, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(TP)]
    for i, (kind, size, split) in enumerate(TP_CASES):
        want = tower_run(*tp_case(kind, size))
        for rank in ranks:
            got = rank[i]
            assert got["sequence_split"] == split, (kind, size)
            diff = (got["out"] - want["out"]).abs().max().item()
            # relative to the tower's largest gradient entry (they sum over 2 x tokens x 32 outputs; some are
            # zero in exact arithmetic, e.g. the key bias's, which softmax cancels)
            scale = max(g.abs().max().item() for g in want["grads"].values())
            gdiff = max((got["grads"][n] - g).abs().max().item() for n, g in want["grads"].items()) / scale
            print(f"tp=2 {kind} {size}px (sequence split: {split}): max abs diff out {diff:.1e}, "
                  f"grads {gdiff:.1e} of the largest ({scale:.0f})")
            assert diff <= 1e-5 and gdiff <= 1e-5
