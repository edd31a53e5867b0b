"""Training images: the user's photos (and the generated class images) as tensors, for train.py and edit.py.

A folder of JPEG/PNG/WebP/BMP files, or one file; a same-named .txt beside an image is its caption. Each image is
turned upright (EXIF), made RGB (transparency on white), its shorter side resized to the training resolution and
centre-cropped; where the square came from (`Crop`) is SDXL's micro-conditioning. Damaged files of a folder are
skipped with one warning listing them.
"""
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, ImageOps

from support.files import atomic_write

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# The user's own photos, not uploads: a 200 MP camera file is no decompression bomb (PIL's default limit is 89 MP,
# an error above 179 MP). A limit stays, far above any camera, so that a damaged header claiming 100k x 100k pixels
# is refused at open (PIL raises DecompressionBombError above twice this) instead of allocating 30 GB.
MAX_PIXELS = 1_000_000_000
# What PIL raises for damaged files: OSError (UnidentifiedImageError, truncated data), SyntaxError (broken PNG
# chunks), ValueError and OverflowError (nonsense BMP headers), DecompressionBombError (a header claiming more than
# 2 gigapixels); not MemoryError or a bug
UNREADABLE = (OSError, SyntaxError, ValueError, OverflowError, Image.DecompressionBombError)


class Crop(NamedTuple):
    """Where a training image's R x R square comes from, in pixels, for SDXL's micro-conditioning (the time ids,
    as diffusers' DreamBooth-SDXL script makes them): `original_size` (h, w) of the image before resizing (after its
    EXIF orientation), and the crop's (top, left) corner in the resized image, `top_left`; `flipped_top_left` is
    that corner in the mirrored resized image, whose crop is the mirror of ours (--flip), so its left offset is
    measured from the other side. (diffusers' script flips before its centre crop and reports the same corner
    flipped or not; on an odd margin its flipped square is one pixel off the mirror of the unflipped one. Ours
    is the mirror, and its corner says where it really is.)"""
    original_size: tuple[int, int]
    top_left: tuple[int, int]
    flipped_top_left: tuple[int, int]


def open_image(path: Path):
    """A photo as the RGB image it shows: EXIF orientation applied, any mode converted to RGB (transparency on
    white, 16-bit grey scaled to 8 bits), every pixel decoded (so a damaged file fails here, not later)."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits before RGB
            im = im.point(lambda v: v / 256).convert("L")
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")  # transparency composited on white, not black
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def load_image(path: Path, resolution: int):
    """One training image as a [3, R, R] tensor in [-1, 1]: `open_image`, shorter side resized to R (upscaling
    small images), centre crop. Returns (tensor, Crop, warning or None)."""
    im = open_image(path)
    w, h = original = im.size
    small = min(w, h) < resolution
    # The square keeps min/max of the image: a 1200x200 photo its middle sixth, and the subject may be in what
    # is cut off. Warned below half (longer than 2:1): photos' usual shapes keep more (4:3 75 %, 3:2 67 %,
    # 16:9 56 %) and stay quiet; panoramas and strips are named, as small images are.
    kept = min(w, h) / max(w, h)
    warning = f"{path.name} is {w}x{h}"
    if small:
        warning += f", smaller than --resolution {resolution}: upscaled"
    if kept < 0.5:  # floored, so that it never reads "50%"
        warning += (f"{'; ' if small else ': '}the centre crop keeps {int(kept * 100)}% of it, the middle square; "
                    "crop it around the subject yourself")
    warning = warning if small or kept < 0.5 else None
    # The shorter side to R and the longer one truncated, as torchvision's Resize(R) sizes it, then the centre
    # crop where torchvision's CenterCrop cuts (half the margin, rounded half to even): the squares (and, for
    # SDXL, the crop corners) of diffusers' DreamBooth scripts
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    im = im.resize(size, Image.Resampling.BICUBIC if small else Image.Resampling.LANCZOS)
    w, h = im.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    crop = Crop(original[::-1], (top, left), (top, w - resolution - left))
    return x.permute(2, 0, 1).float() / 127.5 - 1, crop, warning


def save_png(image, path: Path):
    """A PNG written whole or not at all (Ctrl-C, a full disk)."""
    atomic_write(lambda p: image.save(p, format="PNG"), path)


def image_files(folder: Path, flag: str = "--images") -> list[Path]:
    """The images `folder` names: its JPEG/PNG/WebP/BMP files, sorted by name, or itself when it is a file."""
    if folder.is_file():
        return [folder]
    if folder.is_dir():
        return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    raise ValueError(f"{flag} {folder}: no such folder or image file; pass a JPEG/PNG/WebP/BMP image or a "
                     "folder of them")


def unreadable(flag: str, f: Path, e: Exception) -> ValueError:
    return ValueError(f"{flag} {f}: cannot be read as an image ({type(e).__name__}); pass a JPEG/PNG/WebP/BMP file")


def check_images(folder: Path, flag: str = "--images"):
    """Before any model is loaded or fetched: `folder` is an image that can be read, or a folder holding at least
    one (its damaged files are listed when it is loaded, `load_image_folder`). The same error lines as loading."""
    files = image_files(folder, flag)
    for f in files:
        try:
            open_image(f)
            return
        except UNREADABLE as e:
            if f == folder:
                raise unreadable(flag, f, e) from None
    raise ValueError(f"{flag} {folder}: no usable images (JPEG/PNG/WebP/BMP) in it")


def load_image_folder(folder: Path, resolution: int, flag: str = "--images", limit: int | None = None):
    """All readable images of a folder (the first `limit` of them), sorted by name, or the one image file `folder`
    names, with their captions (a same-named .txt beside an image) and crops (`Crop`): (images, captions, crops).
    Unreadable files of a folder are listed and skipped; an unreadable single file, or no usable image, is an
    error. `flag` names the option in messages."""
    files = image_files(folder, flag)
    images, captions, crops, bad = [], [], [], []
    for f in files:
        if len(images) == limit:
            break
        try:
            x, crop, warning = load_image(f, resolution)
        except UNREADABLE as e:
            if f == folder:
                raise unreadable(flag, f, e) from None
            bad.append(f"{f.name} ({type(e).__name__})")
            continue
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        images.append(x)
        crops.append(crop)
        txt = f.with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.is_file() else None)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable file(s) in {folder}: {', '.join(bad)}", file=sys.stderr)
    if not images:
        raise ValueError(f"{flag} {folder}: no usable images (JPEG/PNG/WebP/BMP) in it")
    return images, captions, crops


# ---------------------------------------------------------------------------------------------------------------
# The class images' cache (train.py --class-dir): what they were made for


MADE_FOR = "made_for.json"
GENERATED = re.compile(r"\d{5}\.png")  # the names train.py gives the images it generates


def reusable_class_images(folder: Path, made_for: dict) -> list[Path]:
    """The class images of `folder` that may be used for `made_for` (the base model's fingerprint, the resolution,
    the class prompt), creating it if need be; class images of another model, size or prompt are never reused
    silently. Those made for something else (MADE_FOR says so) are deleted, saying so, and made anew; images with
    no record (put there by hand, or by an older version) are used, saying so once."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / MADE_FOR
    files = image_files(folder, "--class-dir")
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except ValueError:
            recorded = {}
        if recorded == made_for:
            return files
        differ = ", ".join(k for k in made_for if recorded.get(k) != made_for[k]) or "the record"
        stale = [f for f in files if GENERATED.fullmatch(f.name)]
        print(f"note: the {len(stale)} class images in {folder} were made for another {differ}; making new ones",
              file=sys.stderr)
        for f in stale:
            f.unlink()
        files = [f for f in files if f not in stale]
    elif files:
        print(f"note: using the {len(files)} class images in {folder}, which record no base model, resolution or "
              f"prompt (put there by hand?); delete them to have new ones made", file=sys.stderr)
        return files
    record.write_text(json.dumps(made_for))
    return files
