"""Render one emoji in one style to a square RGBA PNG (64 px by default), cached on disk.

PNG sources are resized; SVG sources are rasterised with resvg (``resvg-py``, no system fonts: emoji
SVGs are pure paths); the Noto colour font is drawn with Pillow (its CBDT bitmap strike, 109 px) and
its glyph box is centred on a transparent square. An emoji that a font cannot draw as one glyph (it
would fall back to several glyphs side by side) is reported as missing, never drawn wrong.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

NOTO_STRIKE = 109  # the only bitmap size in NotoColorEmoji.ttf


class RenderError(ValueError):
    pass


def _square(image: Image.Image, size: int) -> Image.Image:
    """Fit an RGBA image into a transparent size x size square, keeping its aspect ratio."""
    image = image.convert("RGBA")
    scale = size / max(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(resized, ((size - w) // 2, (size - h) // 2))
    return canvas


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def from_png(path: str | Path, size: int) -> bytes:
    with Image.open(path, formats=("PNG",)) as image:
        if image.size == (size, size) and image.mode == "RGBA":
            return Path(path).read_bytes()
        return _png(_square(image, size))


def from_svg(svg: str, size: int) -> bytes:
    try:
        import resvg_py
    except ImportError:
        raise RenderError("resvg-py is not installed (pip install -r requirements.txt); it rasterises the "
                          "OpenMoji and Fluent SVGs") from None
    try:
        data = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True))
    except Exception as exn:  # resvg raises on malformed SVG
        raise RenderError(f"resvg failed: {exn}") from None
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        if image.size != (size, size):
            return _png(_square(image, size))
    return data


class NotoRenderer:
    def __init__(self, font_path: str | Path) -> None:
        self.font = ImageFont.truetype(str(font_path), NOTO_STRIKE)
        self.advance = self.font.getlength("\U0001F600")

    def __call__(self, chars: str, size: int) -> bytes:
        if self.font.getlength(chars) > 1.5 * self.advance:
            raise RenderError("the font has no single glyph for this sequence")
        canvas = Image.new("RGBA", (2 * NOTO_STRIKE, 2 * NOTO_STRIKE), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((NOTO_STRIKE // 4, NOTO_STRIKE // 4), chars, font=self.font, embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        if box is None:
            raise RenderError("the font draws nothing for this emoji")
        return _png(_square(canvas.crop(box), size))


def cached(path: Path, render) -> Path:
    """Render once: ``render()`` -> bytes written atomically to ``path``; later calls reuse the file."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(render())
        tmp.replace(path)
    return path
