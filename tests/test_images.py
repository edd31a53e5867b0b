"""train.load_image_folder (train.py's and edit.py's images): which failures mean a damaged file, skipped with a
warning, and which are not about the file and are raised."""
import io

import numpy as np
import pytest
from PIL import Image

import train


def encoded(fmt, damage=None):
    """A small photo encoded as `fmt`, with one byte (offset, value) overwritten."""
    b = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(b, format=fmt)
    data = bytearray(b.getvalue())
    if damage:
        data[damage[0]] = damage[1]
    return bytes(data)


def test_damaged_files_of_every_kind_pil_reports_are_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "good.png").write_bytes(encoded("PNG"))
    broken = {"bad-chunk.png": (encoded("PNG", (36, 106)), "SyntaxError"),        # chunk type after IHDR
              "bad-compression.bmp": (encoded("BMP", (30, 1)), "ValueError"),     # unknown raw mode
              "huge-width.bmp": (encoded("BMP", (21, 136)), "DecompressionBombError"),  # width's top byte: claims
                                                                      # 2e9 x 32 px, refused before allocating
              "not-an-image.jpg": (b"not an image", "UnidentifiedImageError"),    # an OSError
              "truncated.jpg": (encoded("JPEG")[:400], "OSError")}
    for name, (data, _) in broken.items():
        (tmp_path / name).write_bytes(data)
    images, _, _ = train.load_image_folder(tmp_path, 32)
    assert len(images) == 1
    err = capsys.readouterr().err
    assert all(f"{name} ({kind})" in err for name, (_, kind) in broken.items()), err


@pytest.mark.parametrize("error", [MemoryError, TypeError])
def test_errors_that_are_not_about_the_file_are_raised(tmp_path, monkeypatch, error):
    (tmp_path / "good.png").write_bytes(encoded("PNG"))
    def fail(*args):
        raise error("not about the file")
    monkeypatch.setattr(train, "load_image", fail)
    with pytest.raises(error):
        train.load_image_folder(tmp_path, 32)
