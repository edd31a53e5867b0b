"""data.py: the images train.py and edit.py read. Every kind becomes an RGB square; which failures mean a damaged
file, skipped with a warning, and which are not about the file and are raised."""
import io

import numpy as np
import pytest
from PIL import Image

import data


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
    images, _, _ = data.load_image_folder(tmp_path, 32)
    assert len(images) == 1
    err = capsys.readouterr().err
    assert all(f"{name} ({kind})" in err for name, (_, kind) in broken.items()), err


@pytest.mark.parametrize("error", [MemoryError, TypeError])
def test_errors_that_are_not_about_the_file_are_raised(tmp_path, monkeypatch, error):
    (tmp_path / "good.png").write_bytes(encoded("PNG"))
    def fail(*args):
        raise error("not about the file")
    monkeypatch.setattr(data, "load_image", fail)
    with pytest.raises(error):
        data.load_image_folder(tmp_path, 32)


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
    images, captions, _ = data.load_image_folder(tmp_path, 64)
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
    rotated, _, _ = data.load_image(tmp_path / "rotated.jpg", 64)
    assert (rotated - data.load_image(tmp_path / "turned.png", 64)[0]).abs().mean() < 0.05
    assert (rotated - data.load_image(tmp_path / "unturned.png", 64)[0]).abs().mean() > 0.1


def test_huge_photos_are_not_taken_for_decompression_bombs(tmp_path, monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (179 MP by default; phones take 200 MP): shrink the limit so
    that a small image stands for a huge one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((100, 300, 3), "uint8")).save(tmp_path / "huge.png")
    x, _, warning = data.load_image(tmp_path / "huge.png", 64)
    assert x.shape == (3, 64, 64) and warning is None
    assert data.MAX_PIXELS >= 200_000_000  # a 200 MP photo without even PIL's warning
