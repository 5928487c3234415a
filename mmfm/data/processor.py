"""Image preprocessing: a decoded image -> the vision tower's pixels [3, image_size, image_size], float32.

Steps: RGB; optionally LLaVA-1.5's pad to square; resize (stretch to a square, or the shorter side to image_size
and the centre crop); per channel (x / 255 - mean) / std. The settings are data.image's fields or a Hugging Face
CLIP / SigLIP image processor's preprocessor_config.json. Resizing is Pillow's, as in transformers' PIL image
processors, so mmfm's pixels equal theirs up to the float rounding of the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfm.config.checks import require
from mmfm.config.schema import ImageConfig

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
RESAMPLE_NAMES = {int(code): name for name, code in RESAMPLE.items()}  # PIL's codes: 0, 1, 2, 3
RESIZE_MODES = ("stretch", "shortest_edge")

PREPROCESSOR_FILE = "preprocessor_config.json"  # an image processor's save_pretrained
PROCESSOR_FILE = "processor_config.json"  # a transformers 5 processor's: the image processor under "image_processor"

# transformers' class defaults, for the keys a file leaves out
_HF_COMMON = dict(resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=False)
HF_DEFAULTS = {
    "CLIPImageProcessor": dict(_HF_COMMON, image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711], size={"shortest_edge": 224},
                               do_center_crop=True, crop_size={"height": 224, "width": 224}),
    "SiglipImageProcessor": dict(_HF_COMMON, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                 size={"height": 224, "width": 224}, do_center_crop=False, crop_size=None),
}


@dataclass(frozen=True)
class ImageProcessor:
    """A decoded image -> float32 pixels [3, image_size, image_size] (see the module's doc)."""

    image_size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    resize: str = "stretch"
    pad_to_square: bool = False

    @property
    def background(self) -> tuple[int, ...]:
        """LLaVA's padding colour: the mean on the 0..255 scale, truncated."""
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square:
            image = pad_to_square(image, self.background)
        return self.normalize(self.resized(image))

    def resized(self, image: Image.Image) -> Image.Image:
        n, mode = self.image_size, RESAMPLE[self.resample]
        if self.resize == "stretch":
            return image if image.size == (n, n) else image.resize((n, n), mode)
        return center_crop(image.resize(shortest_edge_size(image.size, n), mode), n)

    def normalize(self, image: Image.Image) -> torch.Tensor:
        # x / (255 std) - mean / std: with the default mean = std = 0.5 this is x / 127.5 - 1.0, bit for bit the
        # loader's formula from before data.image
        std = np.asarray(self.std, dtype=np.float64)
        scale = (std * 255).astype(np.float32)
        shift = (np.asarray(self.mean, dtype=np.float64) / std).astype(np.float32)
        pixels = np.asarray(image, dtype=np.float32) / scale - shift
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image on a square of `color`, offset (long - short) // 2 along the short side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def shortest_edge_size(size: tuple[int, int], n: int) -> tuple[int, int]:
    """(width, height) with the shorter side n and the longer int(n * long / short), as transformers computes it."""
    w, h = size
    if w <= h:
        return n, int(n * h / w)
    return int(n * w / h), n


def center_crop(image: Image.Image, n: int) -> Image.Image:
    """The centre n x n of an image at least n on both sides (offsets rounded down, as transformers')."""
    w, h = image.size
    left, top = (w - n) // 2, (h - n) // 2
    return image.crop((left, top, left + n, top + n))


# ---------------------------------------------------------------- from the config


def check_image_config(cfg: ImageConfig) -> None:
    """data.image's fields; a one-line ConfigError naming the field and the fix."""
    for name in ("mean", "std"):
        values = list(getattr(cfg, name))
        require(len(values) == 3 and all(math.isfinite(v) for v in values),
                f"data.image.{name}={values} must be 3 finite numbers, one per RGB channel, e.g. "
                f"data.image.{name}=[0.5,0.5,0.5]")
    require(all(s > 0 for s in cfg.std), f"data.image.std={list(cfg.std)} must be > 0 in every channel (pixels are "
                                         "divided by it), e.g. data.image.std=[0.5,0.5,0.5]")
    require(cfg.resample in RESAMPLE, f"data.image.resample={cfg.resample!r} is unknown; use one of {tuple(RESAMPLE)}")
    require(cfg.resize in RESIZE_MODES, f"data.image.resize={cfg.resize!r} is unknown; use one of {RESIZE_MODES}")


def image_processor(cfg: ImageConfig, image_size: int) -> ImageProcessor:
    """The processor data.image describes: its fields, or its processor folder's (pad_to_square is always the field)."""
    check_image_config(cfg)
    if cfg.processor:
        return replace(processor_from_hf(cfg.processor, image_size), pad_to_square=cfg.pad_to_square)
    return ImageProcessor(image_size, tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std),
                          cfg.resample, cfg.resize, cfg.pad_to_square)


# ---------------------------------------------------------------- Hugging Face image processors


def _error(message: str) -> Exception:
    from mmfm.checkpoint.hf import HFCheckpointError  # imported here: the loader's workers need no checkpoint code

    return HFCheckpointError(message)


def read_image_processor_config(folder: str | Path) -> tuple[Path, dict]:
    """(the file, its image processor dict): preprocessor_config.json, else processor_config.json's image_processor.
    Read as untrusted JSON (size-capped; nothing in it is run)."""
    from mmfm.checkpoint.hf import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise _error(f"{folder} is not a folder; point data.image.processor at a Hugging Face model folder with a "
                     f"{PREPROCESSOR_FILE}")
    if (folder / PREPROCESSOR_FILE).is_file():
        return folder / PREPROCESSOR_FILE, read_json(folder / PREPROCESSOR_FILE)
    if (folder / PROCESSOR_FILE).is_file():
        nested = read_json(folder / PROCESSOR_FILE).get("image_processor")
        if isinstance(nested, dict):
            return folder / PROCESSOR_FILE, nested
    raise _error(f"{folder} has no {PREPROCESSOR_FILE} (nor an image_processor in {PROCESSOR_FILE}); copy the "
                 "tower's processor files there, or set data.image.processor='' and the data.image fields")


def _hf_class(path: Path, hf: dict) -> str:
    """CLIPImageProcessor or SiglipImageProcessor, whatever backend or older name the file gives."""
    if "auto_map" in hf:
        raise _error(f"{path}: auto_map names custom code; mmfm never runs code from a checkpoint and reads only "
                     "CLIP and SigLIP image processors")
    key = "image_processor_type"
    if not hf.get(key) and "feature_extractor_type" in hf:
        key = "feature_extractor_type"  # files written before transformers had image processors
    name = hf.get(key)
    plain = str(name).removesuffix("Fast").removesuffix("Pil").replace("FeatureExtractor", "ImageProcessor")
    if plain not in HF_DEFAULTS:
        raise _error(f"{path}: {key}={name!r} is not an image processor mmfm reads (it reads {sorted(HF_DEFAULTS)}); "
                     "set data.image.mean/std/resample/resize by hand and data.image.processor=''")
    return plain


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _square(value) -> tuple | None:
    """(height, width) of a crop_size / size of height and width (an int n: n x n); None when malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and {k for k, v in value.items() if v is not None} == {"height", "width"}:
        return value["height"], value["width"]
    return None


def processor_from_hf(folder: str | Path, image_size: int) -> ImageProcessor:
    """The ImageProcessor of a CLIP / SigLIP image processor folder for a model.vision.image_size tower; one-line
    HFCheckpointError naming the file, the field and why, for what mmfm cannot reproduce."""
    path, raw = read_image_processor_config(folder)
    hf = {**HF_DEFAULTS[_hf_class(path, raw)], **raw}

    def refuse(key: str, why: str):
        raise _error(f"{path}: {key}={hf.get(key)!r} {why}")

    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad"):
        if hf.get(key) not in (True, False, None):
            refuse(key, "must be true or false")
    means = {}
    for key in ("image_mean", "image_std"):
        values = hf[key]
        if _is_number(values):
            values = [values] * 3
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)):
            refuse(key, "must be 3 numbers, one per RGB channel")
        means[key] = tuple(float(v) for v in values)
    if min(means["image_std"]) <= 0:
        refuse("image_std", "must be > 0 in every channel")
    if not hf["do_normalize"]:
        means = {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    if not isinstance(hf["resample"], int) or isinstance(hf["resample"], bool) or hf["resample"] not in RESAMPLE_NAMES:
        codes = ", ".join(f"{code} ({name})" for code, name in sorted(RESAMPLE_NAMES.items()))
        refuse("resample", f"is not one of PIL's {codes}, the filters mmfm resizes with")
    if not hf["do_rescale"]:
        refuse("do_rescale", "leaves pixels in 0..255; mmfm scales them by 1/255 before normalizing")
    if not _is_number(hf["rescale_factor"]) or abs(hf["rescale_factor"] * 255 - 1) > 1e-6:
        refuse("rescale_factor", "is not 1/255, the only scale mmfm applies")
    if hf["do_pad"]:
        refuse("do_pad", "pads after resizing, which mmfm does not (data.image.pad_to_square pads before)")
    if not hf["do_resize"]:
        refuse("do_resize", f"keeps each image's own size; mmfm resizes to model.vision.image_size={image_size}")
    resize = _resize_mode(hf, image_size, refuse)
    return ImageProcessor(image_size, means["image_mean"], means["image_std"], RESAMPLE_NAMES[hf["resample"]], resize)


def _resize_mode(hf: dict, n: int, refuse) -> str:
    """stretch or shortest_edge, from size / do_center_crop / crop_size, all at model.vision.image_size=n."""
    fix = "point data.image.processor at this tower's own folder, or set model.vision.image_size to the processor's"
    size = hf["size"]
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"shortest_edge": size}  # transformers reads an int size of CLIP and SigLIP as the shortest edge
    if isinstance(size, dict) and {k for k, v in size.items() if v is not None} == {"shortest_edge"}:
        if size["shortest_edge"] != n:
            refuse("size", f"is not {{'shortest_edge': {n}}} for model.vision.image_size={n}; {fix}")
        if not hf["do_center_crop"]:
            refuse("do_center_crop", "is false after a shortest_edge resize, which leaves images non-square; mmfm's "
                                     "towers take square images")
        mode = "shortest_edge"
    else:
        square = _square(size)
        if square is None:
            refuse("size", "is not {'shortest_edge': N} or {'height': N, 'width': N}, the sizes mmfm reproduces")
        if square != (n, n):
            refuse("size", f"is not {n} x {n}: the tower takes square model.vision.image_size={n} images; {fix}")
        mode = "stretch"  # a centre crop at the resized size changes nothing
    if hf["do_center_crop"] and _square(hf.get("crop_size")) != (n, n):
        refuse("crop_size", f"is not {n} x {n}, model.vision.image_size={n}; {fix}")
    return mode


def processor_config_to_hf(image_cfg: ImageConfig, image_size: int) -> dict:
    """A preprocessor_config.json dict for data.image at image_size: transformers' CLIPImageProcessor
    (resize=shortest_edge) or SiglipImageProcessor (stretch) loads it and gives mmfm's pixels (up to float rounding).
    pad_to_square has no place in it: LLaVA pads before calling the processor."""
    p = image_processor(image_cfg, image_size)
    n = p.image_size
    config = {"do_convert_rgb": True, "do_resize": True, "resample": int(RESAMPLE[p.resample]), "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std)}
    if p.resize == "shortest_edge":
        return {"image_processor_type": "CLIPImageProcessor", **config, "size": {"shortest_edge": n},
                "do_center_crop": True, "crop_size": {"height": n, "width": n}}
    return {"image_processor_type": "SiglipImageProcessor", **config, "size": {"height": n, "width": n},
            "do_center_crop": False}
