"""data.image (mmfm.data.processor): the defaults against the loader's old formula, Hugging Face CLIP / SigLIP image
processors read and written, LLaVA's pad-to-square, and one-line errors. Tiny images; nothing downloads."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line
from mmfm.checkpoint.hf import HFCheckpointError
from mmfm.config import ConfigError, load_config, validate
from mmfm.config.schema import ImageConfig
from mmfm.data.loader import SkipSample, load_image, read_images
from mmfm.data.processor import ImageProcessor, image_processor, processor_config_to_hf, processor_from_hf

import transformers  # noqa: E402  (the dev extra installs it: a missing one fails, never skips)

SIZE = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# mmfm normalizes as x / (255 std) - mean / std in float32; transformers as float32(x * (1/255) in float64), then
# (y - mean) / std in float32. Resizing is the same Pillow call on the same uint8 image, so the two differ only by
# this rounding, a function of (channel, level): over all 256 levels and 3 channels the largest difference is
# 4.8e-7 for CLIP's mean/std (2 ulp at |values| <= 2.15) and 0 for SigLIP's 0.5 / 0.5 (measured, exhaustively).
ATOL = 1e-6


def random_images(seed: int = 0) -> list[Image.Image]:
    """Non-square RGB images (wide, tall, smaller and larger than SIZE) and one already SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    shapes = [(20, 45), (61, 17), (100, 70), (9, 13), (SIZE, SIZE)]  # (height, width)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def old_load_image(data: bytes, size: int) -> torch.Tensor:
    """The loader's formula before data.image (a copy): RGB, stretched with bicubic, scaled to [-1, 1]."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def hf_pixels(folder, images) -> torch.Tensor:
    """transformers' pixels from the folder's image processor; the PIL backend, which transformers 5 also falls back
    to without torchvision (its torchvision backend resizes with other code)."""
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    return processor(images=images, return_tensors="pt").pixel_values


def ours(processor: ImageProcessor, images) -> torch.Tensor:
    return torch.stack([processor(img) for img in images])


def save_clip(folder, **kw):
    transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                    **kw).save_pretrained(folder)
    return folder


def save_siglip(folder, **kw):
    transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, **kw).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- (a) the defaults are the old loader, bit for bit


def test_defaults_are_the_old_formula_bit_for_bit():
    default = image_processor(ImageConfig(), SIZE)
    assert default == ImageProcessor(SIZE)
    images = random_images() + [Image.new("L", (40, 24), 77), Image.new("RGBA", (7, 50), (1, 2, 3, 4)),
                                random_images(1)[0].convert("P")]
    for img in images:
        data = png(img)
        new, old = load_image(data, default), old_load_image(data, SIZE)
        assert new.dtype == torch.float32 and new.shape == (3, SIZE, SIZE)
        assert torch.equal(new, old)
    # the grey image: 77 / 127.5 - 1 everywhere
    grey = np.float32(77) / np.float32(127.5) - 1
    assert torch.equal(load_image(png(images[5]), default), torch.full((3, SIZE, SIZE), grey))


def test_config_defaults_and_interpolation():
    cfg = load_config()
    assert image_processor(cfg.data.image, cfg.model.vision.image_size) == ImageProcessor(cfg.model.vision.image_size)
    cfg = load_config(["model.pretrained.vision=/ckpt/clip", "data.image.processor=${model.pretrained.vision}"])
    assert cfg.data.image.processor == "/ckpt/clip"


def test_read_images_takes_the_processor():
    imgs = random_images()
    raw = {"__key__": "k", "json": b"{}", "b.png": png(imgs[0]), "a.jpg": png(imgs[1])}  # any Pillow format
    p = ImageProcessor(SIZE, resize="shortest_edge")
    got = read_images(raw, p)
    assert len(got) == 2 and torch.equal(got[0], p(imgs[1])) and torch.equal(got[1], p(imgs[0]))
    with pytest.raises(SkipSample) as info:
        read_images({"__key__": "k", "a.png": b"not an image"}, p)
    assert info.value.args[0] == "bad_image"


# ---------------------------------------------------------------- (b) transformers' CLIP and SigLIP processors


@pytest.mark.parametrize("save,kw,expected", [
    (save_clip, {}, ImageProcessor(SIZE, tuple(CLIP_MEAN), tuple(CLIP_STD), "bicubic", "shortest_edge")),
    (save_clip, dict(resample=2), ImageProcessor(SIZE, tuple(CLIP_MEAN), tuple(CLIP_STD), "bilinear", "shortest_edge")),
    (save_clip, dict(resample=1, do_normalize=False), ImageProcessor(SIZE, (0.0,) * 3, (1.0,) * 3, "lanczos",
                                                                     "shortest_edge")),
    (save_siglip, {}, ImageProcessor(SIZE, (0.5,) * 3, (0.5,) * 3, "bicubic", "stretch")),
    (save_siglip, dict(resample=0, image_mean=CLIP_MEAN, image_std=CLIP_STD),
     ImageProcessor(SIZE, tuple(CLIP_MEAN), tuple(CLIP_STD), "nearest", "stretch")),
], ids=["clip", "clip-bilinear", "clip-lanczos-unnormalized", "siglip", "siglip-nearest-clip-mean"])
def test_pixels_equal_transformers(tmp_path, save, kw, expected):
    folder = save(tmp_path, **kw)
    processor = processor_from_hf(folder, SIZE)
    assert processor == expected
    images = random_images()
    mine, theirs = ours(processor, images), hf_pixels(folder, images)
    assert mine.shape == theirs.shape == (len(images), 3, SIZE, SIZE)
    assert torch.allclose(mine, theirs, rtol=0, atol=ATOL), (mine - theirs).abs().max()
    if expected.mean == (0.5,) * 3:
        assert torch.equal(mine, theirs)  # SigLIP's 0.5 / 0.5: no rounding difference at all


def test_legacy_and_processor_config_files(tmp_path):
    """openai/clip-vit-*'s old file (int sizes, feature_extractor_type, class defaults for the rest) and a
    transformers 5 processor's processor_config.json (the image processor under "image_processor")."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
         "resample": 3, "size": SIZE}))
    processor = processor_from_hf(legacy, SIZE)
    assert processor == ImageProcessor(SIZE, tuple(CLIP_MEAN), tuple(CLIP_STD), "bicubic", "shortest_edge")
    images = random_images()
    assert torch.allclose(ours(processor, images), hf_pixels(legacy, images), rtol=0, atol=ATOL)

    nested = tmp_path / "nested"
    nested.mkdir()
    clip = json.loads((save_clip(tmp_path / "clip") / "preprocessor_config.json").read_text())
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": clip, "processor_class": "X"}))
    assert processor_from_hf(nested, SIZE) == processor


def test_rounding_bound_over_every_level():
    """The ATOL argument, measured: both normalizations of every level 0..255 in every channel at CLIP's mean/std."""
    from transformers.image_transforms import normalize, rescale

    levels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None]  # 1 x 256 x 3
    mine = ImageProcessor(SIZE, tuple(CLIP_MEAN), tuple(CLIP_STD)).normalize(Image.fromarray(levels)).numpy()
    theirs = normalize(rescale(levels, 1 / 255, input_data_format="channels_last"), CLIP_MEAN, CLIP_STD,
                       input_data_format="channels_last").transpose(2, 0, 1)
    assert theirs.dtype == np.float32 and np.abs(theirs).max() < 2.2
    assert np.abs(mine - theirs).max() == 2.0 ** -21  # 4.8e-7: 2 ulp of float32 in [2, 4)


# ---------------------------------------------------------------- (c) LLaVA-1.5's pad to square


def expand2square_reference(img: Image.Image, color: tuple) -> Image.Image:
    """LLaVA-1.5's expand2square (llava/mm_utils.py), written with numpy: the image pasted at offset
    (long - short) // 2 along its short side of a square filled with `color`."""
    a = np.asarray(img)
    h, w, _ = a.shape
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = color
    top, left = (side - h) // 2, (side - w) // 2
    out[top: top + h, left: left + w] = a
    return Image.fromarray(out)


def test_pad_to_square_is_llava_expand2square(tmp_path):
    folder = save_clip(tmp_path)
    padded = image_processor(ImageConfig(processor=str(folder), pad_to_square=True), SIZE)
    plain = dataclasses.replace(padded, pad_to_square=False)
    color = tuple(int(m * 255) for m in CLIP_MEAN)  # LLaVA: the processor's image_mean on 0..255
    assert padded.background == color == (122, 116, 104)
    images = random_images()
    reference = [expand2square_reference(img, color) for img in images]
    assert torch.equal(ours(padded, images), ours(plain, reference))
    assert torch.allclose(ours(padded, images), hf_pixels(folder, reference), rtol=0, atol=ATOL)
    # a 20 x 45 (h x w) image becomes 45 x 45, its top rows background: at 32 px the first row is all padding
    first_row = padded(images[0])[:, 0, :]
    expected = (torch.tensor(color, dtype=torch.float64) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(first_row, expected[:, None].float().expand(3, SIZE), rtol=0, atol=ATOL)

    # with the fields instead of a folder: the defaults' grey (127, 127, 127), stretched afterwards
    grey = ImageProcessor(SIZE, pad_to_square=True)
    assert grey.background == (127, 127, 127)
    expected = ours(ImageProcessor(SIZE), [expand2square_reference(img, (127, 127, 127)) for img in images])
    assert torch.equal(ours(grey, images), expected)


# ---------------------------------------------------------------- (d) writing preprocessor_config.json


@pytest.mark.parametrize("cfg,cls", [
    (ImageConfig(), "SiglipImageProcessorPil"),
    (ImageConfig(mean=CLIP_MEAN, std=CLIP_STD, resize="shortest_edge", resample="bilinear"), "CLIPImageProcessorPil"),
    (ImageConfig(mean=[0.1, 0.2, 0.3], std=[0.9, 0.8, 0.7], resample="lanczos"), "SiglipImageProcessorPil"),
], ids=["defaults", "clip-like", "lanczos"])
def test_written_config_round_trips(tmp_path, cfg, cls):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor_config_to_hf(cfg, SIZE), indent=2))
    assert type(transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")).__name__ == cls
    mine = image_processor(cfg, SIZE)
    assert processor_from_hf(tmp_path, SIZE) == mine
    images = random_images()
    assert torch.allclose(ours(mine, images), hf_pixels(tmp_path, images), rtol=0, atol=ATOL)


# ---------------------------------------------------------------- (e) one-line errors


CLIP_FILE = dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": SIZE},
                 crop_size={"height": SIZE, "width": SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
BAD_FILES = [
    (dict(crop_size={"height": 30, "width": 30}),
     "crop_size={'height': 30, 'width': 30} is not 32 x 32, model.vision.image_size=32; point"),
    (dict(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
     "size={'shortest_edge': 64} is not {'shortest_edge': 32} for model.vision.image_size=32; point"),
    (dict(size={"height": SIZE, "width": 48}, do_center_crop=False),
     "size={'height': 32, 'width': 48} is not 32 x 32: the tower takes square"),
    (dict(size={"shortest_edge": SIZE, "longest_edge": 64}), "size={'shortest_edge': 32, 'longest_edge': 64} is not"),
    (dict(do_center_crop=False), "do_center_crop=False is false after a shortest_edge resize"),
    (dict(resample=5), "resample=5 is not one of PIL's 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic)"),
    (dict(resample="bicubic"), "resample='bicubic' is not one of PIL's"),
    (dict(image_mean=[0.5, 0.5]), "image_mean=[0.5, 0.5] must be 3 numbers"),
    (dict(image_std=[0.5, 0, 0.5]), "image_std=[0.5, 0, 0.5] must be > 0"),
    (dict(do_rescale=False), "do_rescale=False leaves pixels in 0..255"),
    (dict(rescale_factor=1 / 127.5), "rescale_factor=0.00784313725490196 is not 1/255"),
    (dict(do_resize=False), "do_resize=False keeps each image's own size"),
    (dict(do_pad=True), "do_pad=True pads after resizing"),
    (dict(do_normalize="yes"), "do_normalize='yes' must be true or false"),
    (dict(image_processor_type="ViTImageProcessor"),
     "image_processor_type='ViTImageProcessor' is not an image processor"),
    (dict(auto_map={"AutoImageProcessor": "x.Y"}), "auto_map names custom code"),
]


@pytest.mark.parametrize("change,message", BAD_FILES, ids=[f"{i}-{m.split('=')[0]}" for i, (_, m) in
                                                          enumerate(BAD_FILES)])
def test_bad_processor_file_is_one_line(tmp_path, change, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**CLIP_FILE, **change}))
    one_line(HFCheckpointError, lambda: processor_from_hf(tmp_path, SIZE),
             f"{tmp_path / 'preprocessor_config.json'}: {message}")


def test_missing_or_broken_processor_file(tmp_path):
    one_line(HFCheckpointError, lambda: processor_from_hf(tmp_path / "nope", SIZE), "nope is not a folder")
    one_line(HFCheckpointError, lambda: processor_from_hf(tmp_path, SIZE),
             "has no preprocessor_config.json (nor an image_processor in processor_config.json)")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    one_line(HFCheckpointError, lambda: processor_from_hf(tmp_path, SIZE), "preprocessor_config.json is not valid JSON")


@pytest.mark.parametrize("override,message", [
    ("data.image.mean=[0.5,0.5]", "data.image.mean=[0.5, 0.5] must be 3 finite numbers, one per RGB channel"),
    ("data.image.std=[0.5,0,0.5]", "data.image.std=[0.5, 0.0, 0.5] must be > 0 in every channel"),
    ("data.image.resample=cubic", "data.image.resample='cubic' is unknown; use one of ('bicubic', 'bilinear', "
                                  "'nearest', 'lanczos')"),
    ("data.image.resize=crop", "data.image.resize='crop' is unknown; use one of ('stretch', 'shortest_edge')"),
    ("data.image.processor=/no/such/folder", "data.image.processor: /no/such/folder is not a folder"),
])
def test_bad_image_fields_are_one_line_config_errors(override, message):
    cfg = load_config([override])
    one_line(ConfigError, lambda: validate(cfg), message)


def test_processor_folder_checked_against_image_size(tmp_path):
    save_clip(tmp_path)  # 32 px
    cfg = load_config([f"data.image.processor={tmp_path}", f"model.vision.image_size={SIZE}"])
    assert validate(cfg) is cfg
    cfg = load_config([f"data.image.processor={tmp_path}"])  # tiny_vlm's 64 px
    assert cfg.model.vision.image_size == 64
    one_line(ConfigError, lambda: validate(cfg), f"data.image.processor: {tmp_path / 'preprocessor_config.json'}: "
             "size={'shortest_edge': 32} is not {'shortest_edge': 64} for model.vision.image_size=64; point "
             "data.image.processor at this tower's own folder, or set model.vision.image_size to the processor's")
