"""data.py: the images train.py and edit.py read. Every kind becomes an RGB square; which failures mean a damaged
file, skipped with a warning, and which are not about the file and are raised."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from support import photos



def encoded(fmt, damage=None):
    """A small photo encoded as `fmt`, with one byte (offset, value) overwritten."""
    b = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(b, format=fmt)
    raw = bytearray(b.getvalue())
    if damage:
        raw[damage[0]] = damage[1]
    return bytes(raw)


def test_damaged_files_of_every_kind_pil_reports_are_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "good.png").write_bytes(encoded("PNG"))
    broken = {"bad-chunk.png": (encoded("PNG", (36, 106)), "SyntaxError"),        # chunk type after IHDR
              "bad-compression.bmp": (encoded("BMP", (30, 1)), "ValueError"),     # unknown raw mode
              "huge-width.bmp": (encoded("BMP", (21, 136)), "DecompressionBombError"),  # width's top byte: claims
                                                                      # 2e9 x 32 px, refused before allocating
              "not-an-image.jpg": (b"not an image", "UnidentifiedImageError"),    # an OSError
              "truncated.jpg": (encoded("JPEG")[:400], "OSError")}
    for name, (raw, _) in broken.items():
        (tmp_path / name).write_bytes(raw)
    images, _, _ = photos.load_image_folder(tmp_path, 32)
    assert len(images) == 1
    err = capsys.readouterr().err
    assert all(f"{name} ({kind})" in err for name, (_, kind) in broken.items()), err


@pytest.mark.parametrize("error", [MemoryError, TypeError])
def test_errors_that_are_not_about_the_file_are_raised(tmp_path, monkeypatch, error):
    (tmp_path / "good.png").write_bytes(encoded("PNG"))
    def fail(*args):
        raise error("not about the file")
    monkeypatch.setattr(photos, "load_image", fail)
    with pytest.raises(error):
        photos.load_image_folder(tmp_path, 32)


def test_images_of_every_kind_become_rgb_squares(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rgb = (rng.random((60, 90, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((rng.random((70, 50)) * 65535).astype("uint16")).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).save(tmp_path / "photo.webp")
    Image.fromarray(rgb).save(tmp_path / "photo.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° when shown
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "rotated.txt").write_text("a photo of sks dog on a sofa\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    images, captions, _ = photos.load_image_folder(tmp_path, 64)
    assert len(images) == 5 and all(x.shape == (3, 64, 64) for x in images)
    assert all(-1 <= x.min() and x.max() <= 1 for x in images)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt" and p.name != "broken.png")
    assert captions[names.index("rotated.jpg")] == "a photo of sks dog on a sofa"
    err = capsys.readouterr().err
    assert "broken.png" in err and "upscaled" in err
    # EXIF orientation 6 applied: the same as an image already turned 90° clockwise
    smooth = np.kron(rng.random((6, 9, 3)) * 255, np.ones((10, 10, 1))).astype("uint8")
    Image.fromarray(smooth).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(smooth).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "turned.png")
    Image.fromarray(smooth).save(tmp_path / "unturned.png")
    rotated, _, _ = photos.load_image(tmp_path / "rotated.jpg", 64)
    assert (rotated - photos.load_image(tmp_path / "turned.png", 64)[0]).abs().mean() < 0.05
    assert (rotated - photos.load_image(tmp_path / "unturned.png", 64)[0]).abs().mean() > 0.1


def test_huge_photos_are_not_taken_for_decompression_bombs(tmp_path, monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (179 MP by default; phones take 200 MP): shrink the limit so
    that a small image stands for a huge one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((100, 200, 3), "uint8")).save(tmp_path / "huge.png")
    x, _, warning = photos.load_image(tmp_path / "huge.png", 64)
    assert x.shape == (3, 64, 64) and warning is None
    assert photos.MAX_PIXELS >= 200_000_000  # a 200 MP photo without even PIL's warning


def test_transparency_is_composited_on_white(tmp_path):
    """A cut-out photo's transparent background becomes white (a black one would teach the model black
    backgrounds), for RGBA, grey with alpha and palette images with a transparent colour; opaque pixels keep theirs."""
    rgba = np.zeros((64, 64, 4), "uint8")
    rgba[:, :32] = [200, 30, 30, 255]  # opaque red on the left, fully transparent black on the right
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png", transparency=0)  # palette index 0: black
    for name in ("rgba.png", "la.png", "p.png"):
        x, _, _ = photos.load_image(tmp_path / name, 64)
        assert torch.equal(x[:, :, 40:], torch.ones(3, 64, 24)), name  # white, [-1, 1] -> 1
        assert x[:, :, :24].mean() < 0, name  # the opaque half stays dark red


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path):
    """Half of 16-bit full scale is mid grey (128), not white as a clip to 8 bits would make it."""
    Image.fromarray(np.full((64, 80), 32768, "uint16")).save(tmp_path / "grey16.png")
    x, _, _ = photos.load_image(tmp_path / "grey16.png", 64)
    assert torch.equal(x, torch.full((3, 64, 64), 128.0) / 127.5 - 1)


def test_only_images_smaller_than_the_resolution_are_upscaled_with_a_warning(tmp_path):
    Image.fromarray(np.zeros((64, 80, 3), "uint8")).save(tmp_path / "exact.png")
    Image.fromarray(np.zeros((63, 80, 3), "uint8")).save(tmp_path / "small.png")
    assert photos.load_image(tmp_path / "exact.png", 64)[2] is None
    assert "small.png is 80x63, smaller than --resolution 64: upscaled" == photos.load_image(tmp_path / "small.png", 64)[2]


def test_a_centre_crop_that_keeps_less_than_half_of_the_image_warns_naming_it(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 64, 3), "uint8")).save(tmp_path / "half.png")    # 2:1, the square keeps half
    Image.fromarray(np.zeros((32, 65, 3), "uint8")).save(tmp_path / "wider.png")   # keeps 32/65 = 49 %
    Image.fromarray(np.zeros((200, 1200, 3), "uint8")).save(tmp_path / "strip.png")
    assert photos.load_image(tmp_path / "half.png", 32)[2] is None
    assert photos.load_image(tmp_path / "wider.png", 32)[2] == (
        "wider.png is 65x32: the centre crop keeps 49% of it, the middle square; crop it around the subject yourself")
    photos.load_image_folder(tmp_path / "strip.png", 32)
    assert "warning: strip.png is 1200x200: the centre crop keeps 16% of it" in capsys.readouterr().err
    # both warnings, when a small image is also a strip
    assert photos.load_image(tmp_path / "wider.png", 40)[2] == (
        "wider.png is 65x32, smaller than --resolution 40: upscaled; the centre crop keeps 49% of it, the middle "
        "square; crop it around the subject yourself")


def test_limit_takes_the_first_readable_images_by_name(tmp_path, capsys):
    """--class-dir's limit (--num-class-images) counts the images read, not the files: a damaged one is skipped
    and the next one taken; files after the limit are not read."""
    (tmp_path / "00.png").write_bytes(b"not an image")
    for i in range(1, 5):
        Image.fromarray(np.full((8, 8, 3), 10 * i, "uint8")).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"caption {i}")
    images, captions, crops = photos.load_image_folder(tmp_path, 8, limit=2)
    assert captions == ["caption 1", "caption 2"] and len(images) == len(crops) == 2
    assert [round(float((x[0, 0, 0] + 1) * 127.5)) for x in images] == [10, 20]
    assert "00.png (UnidentifiedImageError)" in capsys.readouterr().err
