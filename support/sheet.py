"""A comparison sheet: images side by side, one row each, every caption written under its image."""
from PIL import Image, ImageDraw, ImageFont


def comparison(rows):
    """rows of [(PIL image, caption)] -> one sheet with each caption written under its image (PIL's default
    font, word-wrapped to the image width)."""
    w, h = rows[0][0][0].size
    try:
        font = ImageFont.load_default(size=max(10, w // 32))  # scalable where Pillow has FreeType
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text):
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if draw.textlength(line, font=font) <= w - 8 or not lines[-1]:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    wrapped = [[wrap(caption) for _, caption in row] for row in rows]
    line_h = font.getbbox("Ay")[3] + 3
    caption_h = max(len(lines) for row in wrapped for lines in row) * line_h + 8
    sheet = Image.new("RGB", (max(len(r) for r in rows) * w, len(rows) * (h + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (im, _) in enumerate(row):
            x, y = c * w, r * (h + caption_h)
            sheet.paste(im, (x, y))
            for k, line in enumerate(wrapped[r][c]):
                draw.text((x + 4, y + h + 4 + k * line_h), line, fill="black", font=font)
    return sheet
