"""Images -> pixel values as a model repo's preprocessor_config.json says: transformers' CLIPImageProcessor and
ViTImageProcessor, equal to their pixel_values on the PIL path that transformers 5 takes without torchvision
(AutoImageProcessor gives CLIPImageProcessorPil / ViTImageProcessorPil; image_processing_backends.PilBackend).

The steps, each as that path does it: to RGB (transparency composited onto white), PIL resize (to a shortest edge,
the long one truncated to int, or to height x width) with the config's filter, centre crop, rescale (in float64, then
float32), normalise (in float32). EXIF orientation is not applied, as transformers does not: that is the caller's.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# Each processor's defaults, for the keys a preprocessor_config.json leaves out (old ones, written as "feature
# extractors", have no do_rescale or do_convert_rgb), from transformers' class attributes. default_to_square says
# what a bare int `size` means: CLIP's is the shortest edge, ViT's the side of a square.
DEFAULTS = {
    "CLIPImageProcessor": dict(do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=3,
                               do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                               rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                               image_std=OPENAI_CLIP_STD, default_to_square=False),
    # do_convert_rgb unset: transformers then hands a non-RGB image on as it is, and its normalise refuses the
    # channel count (RGBA: 4, palette or grey: 1); we convert such images as CLIP's processor does (Preprocess).
    "ViTImageProcessor": dict(do_convert_rgb=None, do_resize=True, size={"height": 224, "width": 224}, resample=2,
                              do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
                              default_to_square=True),
}


def processor_class(cfg: dict, default: str) -> str:
    """The processor a preprocessor_config.json names, as AutoImageProcessor reads it: image_processor_type, else
    the old feature_extractor_type (CLIPFeatureExtractor is CLIPImageProcessor), else the model's `default`; the
    backend suffixes (Fast: torchvision, Pil) name the same processing."""
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or default
    return name.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")


def size_dict(size, default_to_square: bool, where: str) -> dict:
    """transformers' get_size_dict: an int is a shortest edge or a square (`default_to_square`), a pair is (height,
    width); a dict is taken as it is. Only the two kinds these processors use are supported."""
    if isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"{where}: size {size!r} is not supported: expected a shortest_edge or a height and width")
    return size


@dataclass
class Preprocess:
    do_convert_rgb: bool | None
    do_resize: bool
    size: dict                      # {"shortest_edge": s} or {"height": h, "width": w}
    resample: int                   # PIL's filter numbers: 2 bilinear, 3 bicubic, ...
    do_center_crop: bool
    crop_size: dict | None          # {"height": h, "width": w}
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every image's pixels, or None where it depends on the image (a shortest edge, no crop)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def rgb(self, image: Image.Image) -> Image.Image:
        """transformers' convert_to_rgb: an image with transparency (an alpha band, or a palette's or RGB's
        transparent colour) over white, any other mode converted by PIL. An RGB image is left as it is when the
        config does not convert: transformers then reads its bytes as they are, transparent colour or not."""
        if not self.do_convert_rgb and image.mode == "RGB":
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")

    def __call__(self, images) -> torch.Tensor:
        """PIL images -> [N, 3, H, W] float32 pixel values."""
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        image = self.rgb(image)
        if self.do_resize:
            if "shortest_edge" in self.size:  # get_resize_output_image_size: the long edge truncated, not rounded
                w, h = image.size
                short, long = min(w, h), max(w, h)
                new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
                h, w = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                h, w = self.size["height"], self.size["width"]
            image = image.resize((w, h), resample=Image.Resampling(self.resample), reducing_gap=None)
        if self.do_center_crop:
            # transformers' offsets, (size - crop) // 2; past an edge (an image smaller than the crop) PIL fills
            # zeros, as transformers pads: the same pixels land at the same places
            w, h = image.size
            ch, cw = self.crop_size["height"], self.crop_size["width"]
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 [3, H, W]
        x = (x.double() * self.rescale_factor).float() if self.do_rescale else x.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        return x


def from_config(cfg: dict, default: str, where: str = "preprocessor_config.json") -> Preprocess:
    """A preprocessor_config.json's dict -> Preprocess; `default` is the processor class when the file names none.
    A processor other than CLIP's or ViT's is refused: its steps were not ported."""
    name = processor_class(cfg, default)
    if name not in DEFAULTS:
        raise ValueError(f"{where}: image processor {name} is not supported (only {' and '.join(DEFAULTS)})")
    values = {**DEFAULTS[name], **{k: v for k, v in cfg.items() if k in DEFAULTS[name] and v is not None}}
    square = values.pop("default_to_square")
    values["size"] = size_dict(values["size"], square, where)
    if values["crop_size"] is not None:
        values["crop_size"] = size_dict(values["crop_size"], True, where)
    if values["do_center_crop"] and values["crop_size"] is None:
        raise ValueError(f"{where}: do_center_crop without a crop_size")
    if values["do_resize"] and values["resample"] not in range(6):
        raise ValueError(f"{where}: resample {values['resample']!r} is not one of PIL's filters (0-5)")
    for k in ("image_mean", "image_std"):
        v = values[k]
        values[k] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        if len(values[k]) != 3:
            raise ValueError(f"{where}: {k} {v!r} is not one value per RGB channel")
    return Preprocess(**values)

