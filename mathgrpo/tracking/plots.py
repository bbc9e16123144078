"""Training curves as a PNG."""

from __future__ import annotations

import fnmatch
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mathgrpo.tracking.sinks import format_number

# Each glyph: its character, then 7 rows of 5 bits (bit 4 = leftmost column) as 14 hex digits.
# Lowercase draws as uppercase; a character without a glyph draws as blank.
_FONT = {token[0]: bytes.fromhex(token[1:]) for token in """
    00E11131519110E 1040C040404040E 20E11010204081F 31F02040201110E 402060A121F0202 51F101E0101110E
    60608101E11110E 71F010204080808 80E11110E11110E 90E11110F01020C A0E1111111F1111 B1E11111E11111E
    C0E11101010110E D1C12111111121C E1F10101E10101F F1F10101E101010 G0E11101711110F H1111111F111111
    I0E04040404040E J0702020202120C K11121418141211 L1010101010101F M111B1515111111 N11111915131111
    O0E11111111110E P1E11111E101010 Q0E11111115120D R1E11111E141211 S0F10100E01011E T1F040404040404
    U1111111111110E V11111111110A04 W1111111515150A X11110A040A1111 Y1111110A040404 Z1F01020408101F
    /00010204081000 -0000001F000000 _0000000000001F .00000000000C0C +0004041F040400 :000C0C000C0C00
    @0E11010D15150E %18190204081303 ?0E110102040004 =00001F001F0000 (02040808080402 )08040202020408
    """.split()}
GLYPH_WIDTH, GLYPH_HEIGHT, GLYPH_ADVANCE = 5, 7, 6
DEFAULT_PLOT_KEYS = ("critic/score/mean", "response_length/mean", "actor/entropy", "actor/grad_norm",
                     "val-core/*/mean@*")
PANEL_WIDTH, PANEL_HEIGHT, PANEL_COLUMNS = 360, 220, 2
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 60, 12, 20, 20
BACKGROUND, AXES_COLOR, LINE_COLOR = (255, 255, 255), (0, 0, 0), (31, 119, 180)


def glyph_bitmap(char: str) -> np.ndarray:
    """[7, 5] bool pixels of a character (blank when the font has none)."""
    rows = _FONT.get(char.upper(), bytes(GLYPH_HEIGHT))
    return np.array([[row >> (GLYPH_WIDTH - 1 - col) & 1 for col in range(GLYPH_WIDTH)] for row in rows], bool)


def draw_text(image: np.ndarray, x: int, y: int, text: str, color=AXES_COLOR) -> None:
    """Draws text with its top-left corner at (x, y), clipped to the image."""
    for index, char in enumerate(text):
        left = x + GLYPH_ADVANCE * index
        region = image[max(y, 0):y + GLYPH_HEIGHT, max(left, 0):left + GLYPH_WIDTH]
        bits = glyph_bitmap(char)[max(-y, 0):, max(-left, 0):][:region.shape[0], :region.shape[1]]
        region[bits] = color


def draw_line(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, color=LINE_COLOR) -> None:
    """One pixel per step along the longer axis (a DDA line)."""
    count = max(abs(x1 - x0), abs(y1 - y0)) + 1
    xs = np.rint(np.linspace(x0, x1, count)).astype(int)
    ys = np.rint(np.linspace(y0, y1, count)).astype(int)
    image[ys, xs] = color


def write_png(path: str | os.PathLike, image: np.ndarray, text: Mapping[str, str] | None = None) -> None:
    """8-bit RGB PNG (filter 0 on every row), with tEXt chunks; written atomically."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.astype(np.uint8).reshape(height, width * 3)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for keyword, value in (text or {}).items():
        png += chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(png)
    os.replace(temporary, path)


def _series(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, steps, values) per matched key; a step logged twice (resumed run) keeps its last value."""
    present = list(dict.fromkeys(key for row in rows for key in row if key != "step"))
    matched = []
    for pattern in keys:
        matched += sorted(k for k in present if fnmatch.fnmatchcase(k, pattern)) if any(
            c in pattern for c in "*?[") else [pattern] if pattern in present else []
    series = []
    for key in dict.fromkeys(matched):
        by_step = {int(row["step"]): row[key] for row in rows if key in row}
        steps = np.array(sorted(by_step), dtype=np.float64)
        values = np.array([np.nan if by_step[s] is None else by_step[s] for s in sorted(by_step)], np.float64)
        if np.isfinite(values).any():
            series.append((key, steps, values))
    return series


def plot_curves(rows: Sequence[Mapping[str, Any]], path_png: str | os.PathLike,
                keys: Sequence[str] = DEFAULT_PLOT_KEYS) -> list[dict]:
    """One panel per curve (keys are names or fnmatch patterns), two panels a row, written as a PNG.

    Returns each panel's layout: `box` = (left, top, right, bottom) pixels, where step x_range[0]
    maps to left, x_range[1] to right, value y_range[1] to top and y_range[0] to bottom (rounded).
    """
    series = _series(rows, keys)
    if not series:
        raise ValueError(f"no finite values for any of {list(keys)} in {len(rows)} metric rows")
    columns = min(PANEL_COLUMNS, len(series))
    image = np.empty((math.ceil(len(series) / columns) * PANEL_HEIGHT, columns * PANEL_WIDTH, 3), np.uint8)
    image[:] = BACKGROUND
    panels = []
    for index, (key, steps, values) in enumerate(series):
        origin_x, origin_y = (index % columns) * PANEL_WIDTH, (index // columns) * PANEL_HEIGHT
        left, top = origin_x + _MARGIN_LEFT, origin_y + _MARGIN_TOP
        right, bottom = origin_x + PANEL_WIDTH - _MARGIN_RIGHT, origin_y + PANEL_HEIGHT - _MARGIN_BOTTOM
        finite = values[np.isfinite(values)]
        low, high = float(finite.min()), float(finite.max())
        pad = (high - low) * 0.05 if high > low else max(abs(low) * 0.05, 0.5)
        low, high = low - pad, high + pad
        first = float(steps[0])
        last = float(steps[-1]) if steps[-1] > first else first + 1  # one step: a point at the left
        xs = np.rint(left + (steps - first) / (last - first) * (right - left)).astype(int)
        ys = np.rint(bottom - (values - low) / (high - low) * (bottom - top))
        draw_line(image, left - 1, top, left - 1, bottom + 1, AXES_COLOR)
        draw_line(image, left - 1, bottom + 1, right, bottom + 1, AXES_COLOR)
        draw_text(image, origin_x + 4, origin_y + 5, key)
        draw_text(image, origin_x + 2, top, format_number(high)[:9])
        draw_text(image, origin_x + 2, bottom - GLYPH_HEIGHT, format_number(low)[:9])
        draw_text(image, left, bottom + 6, format_number(first))
        end_label = format_number(float(steps[-1]))
        draw_text(image, right - GLYPH_ADVANCE * len(end_label), bottom + 6, end_label)
        ok = np.isfinite(values)
        for i in range(len(values)):
            if not ok[i]:
                continue
            if i + 1 < len(values) and ok[i + 1]:
                draw_line(image, xs[i], int(ys[i]), xs[i + 1], int(ys[i + 1]))
            elif not (i > 0 and ok[i - 1]):  # an isolated point: a 3x3 dot
                image[int(ys[i]) - 1:int(ys[i]) + 2, xs[i] - 1:xs[i] + 2] = LINE_COLOR
        panels.append({"key": key, "box": (left, top, right, bottom), "x_range": (first, last),
                       "y_range": (low, high)})
    write_png(path_png, image, {"Title": "mathgrpo training curves", "Comment": "\n".join(s[0] for s in series)})
    return panels
