"""support/image_processing gives transformers' pixel_values (the PIL path AutoImageProcessor takes without
torchvision) on real photos, crops of them that are not square, grey, RGBA and palette images.

The two configs are those of openai/clip-vit-base-patch32 and facebook/dino-vits16 as their repos hold them (old
"feature extractor" files: no do_rescale, no do_convert_rgb; a bare int size); ODD exercises the rest (a dict size,
a crop larger than the resized image, which pads)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from conftest import PHOTOS as FOLDER
from support import image_processing

CLIP_B32 = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
DINO_VITS16 = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}
ODD = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40}, "crop_size": {"height": 48,
       "width": 44}, "resample": 2, "do_convert_rgb": True}
CONFIGS = {"clip": (CLIP_B32, "CLIPImageProcessor"), "dino": (DINO_VITS16, "ViTImageProcessor"),
           "odd": (ODD, "CLIPImageProcessor")}
PHOTOS = sorted(p.name for p in FOLDER.glob("*.jpg"))
MADE = ["landscape.jpg", "portrait.png", "small.png", "grey.jpg", "rgba.png", "palette.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Path -> a PIL image as opened from its file: the DreamBench photos, and images made from one of them."""
    folder = tmp_path_factory.mktemp("made")
    dog = Image.open(FOLDER / "dog-00.jpg")
    dog.crop((0, 100, 780, 481)).save(folder / "landscape.jpg")   # 780 x 381
    dog.crop((101, 0, 434, 517)).save(folder / "portrait.png")    # 333 x 517
    dog.crop((300, 300, 450, 390)).save(folder / "small.png")     # 150 x 90: enlarged to reach 224
    dog.crop((0, 0, 600, 500)).convert("L").save(folder / "grey.jpg")
    rgba = dog.crop((50, 50, 650, 450)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))   # every alpha from 0 to 255
    rgba.save(folder / "rgba.png")
    palette = dog.crop((0, 0, 500, 700)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(folder / "palette.png", transparency=0)          # palette entry 0 transparent (a tRNS chunk)
    found = {p: Image.open(FOLDER / p) for p in PHOTOS} | {p: Image.open(folder / p) for p in MADE}
    assert (found["rgba.png"].mode, found["palette.png"].mode, found["grey.jpg"].mode) == ("RGBA", "P", "L")
    assert found["palette.png"].info.get("transparency") == 0
    return found


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """Name -> (transformers' processor read from the config written as preprocessor_config.json, ours)."""
    out = {}
    for name, (cfg, default) in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
        out[name] = AutoImageProcessor.from_pretrained(folder), image_processing.from_config(cfg, default)
    return out


def test_autoimageprocessor_takes_the_pil_path_here(processors):
    """What our port matches: transformers 5 without torchvision gives the PIL backend's classes."""
    assert type(processors["clip"][0]).__name__ == "CLIPImageProcessorPil"
    assert type(processors["dino"][0]).__name__ == "ViTImageProcessorPil"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", PHOTOS + MADE)
def test_pixel_values_equal_the_processors(images, processors, name, path):
    theirs, ours = processors[name]
    image = images[path]
    kwargs = {}
    if name == "dino" and image.mode != "RGB":
        # ViT's config leaves do_convert_rgb unset: transformers then refuses any image but RGB (its normalise finds
        # 1 or 4 channels); ours converts such images as CLIP's processor does, which is what this asks of it
        kwargs["do_convert_rgb"] = True
    expected = theirs(image, return_tensors="pt", **kwargs).pixel_values
    got = ours([image])
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


def test_the_configs_mean_what_transformers_reads_in_them(processors):
    clip, dino, odd = (processors[n][1] for n in ("clip", "dino", "odd"))
    assert clip.size == {"shortest_edge": 224} and clip.output_size() == (224, 224) and clip.resample == 3
    assert dino.size == {"height": 224, "width": 224} and not dino.do_center_crop and dino.output_size() == (224, 224)
    assert odd.output_size() == (48, 44)


def test_a_transparent_image_is_composited_onto_white(processors):
    clear = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    pixels = processors["clip"][1]([clear])[0]
    white = (1 - torch.tensor(image_processing.OPENAI_CLIP_MEAN)) / torch.tensor(image_processing.OPENAI_CLIP_STD)
    assert torch.allclose(pixels[:, 100, 100], white.float(), atol=1e-6)


@pytest.mark.parametrize("cfg,words", [
    ({"image_processor_type": "BitImageProcessor"}, "image processor BitImageProcessor is not supported"),
    ({"feature_extractor_type": "CLIPFeatureExtractor", "size": {"longest_edge": 300}}, "is not supported"),
    ({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5]}, "not one value per RGB channel"),
])
def test_an_unsupported_config_is_one_line(cfg, words):
    with pytest.raises(ValueError, match=words):
        image_processing.from_config(cfg, "CLIPImageProcessor")


def test_rescale_then_normalise_round_as_numpy_does():
    """float64 rescale, then float32 normalise: the pixel values are bit-equal, not just close, on every byte."""
    ours = image_processing.from_config({**DINO_VITS16, "size": 16}, "ViTImageProcessor")
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, -1))
    x = (np.array(ramp).astype(np.float64) * (1 / 255)).astype(np.float32)
    expected = (x - np.array(DINO_VITS16["image_mean"], np.float32)) / np.array(DINO_VITS16["image_std"], np.float32)
    assert torch.equal(ours([ramp])[0], torch.from_numpy(expected).permute(2, 0, 1))
