"""Training curves as a PNG, drawn by matplotlib's Agg renderer (headless).

`plot_curves` reads metrics.jsonl rows and draws one panel per curve, step on the x axis, two panels a
row. It builds a `matplotlib.figure.Figure` with an Agg canvas of its own, so pyplot's global state and
the process's backend are left alone (the trainer draws from a training process that may hold a GUI
backend or none).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_PLOT_KEYS = ("critic/score/mean", "response_length/mean", "actor/entropy", "actor/grad_norm",
                     "val-core/*/mean@*")
PANEL_WIDTH, PANEL_HEIGHT, PANEL_COLUMNS, DPI = 480, 320, 2, 100  # pixels a panel, panels a row, pixels an inch
LINE_COLOR = "#1f77b4"  # matplotlib's tab:blue


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

    A null (non-finite) value leaves a gap in its line; a point with no finite neighbour is drawn as a
    dot. Raises ValueError when no key has a finite value. The PNG is written atomically, with the
    plotted keys in its `Comment` text chunk.

    Returns each panel's layout: `box` = (left, top, right, bottom) pixels of the axes in the image,
    where step x_range[0] maps to left, x_range[1] to right, value y_range[1] to top and y_range[0]
    to bottom.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = _series(rows, keys)
    if not series:
        raise ValueError(f"no finite values for any of {list(keys)} in {len(rows)} metric rows")
    columns = min(PANEL_COLUMNS, len(series))
    panel_rows = math.ceil(len(series) / columns)
    figure = Figure(figsize=(columns * PANEL_WIDTH / DPI, panel_rows * PANEL_HEIGHT / DPI), dpi=DPI,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panel_rows, columns, squeeze=False).ravel()
    for ax in axes[len(series):]:
        ax.set_visible(False)
    for ax, (key, steps, values) in zip(axes, series):
        finite = np.isfinite(values)
        values = np.where(finite, values, np.nan)  # ±inf too: a gap, not an axis to infinity
        ax.plot(steps, values, color=LINE_COLOR, linewidth=1.5)  # NaN breaks the line
        alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
        if alone.any():
            ax.plot(steps[alone], values[alone], "o", color=LINE_COLOR, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        if steps[-1] == steps[0]:  # one step: whole-step ticks around it
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    temporary = f"{os.fspath(path_png)}.tmp"
    figure.savefig(temporary, format="png", metadata={"Title": "mathgrpo training curves",
                                                      "Comment": "\n".join(key for key, _, _ in series)})
    os.replace(temporary, path_png)
    height = figure.bbox.height  # display coordinates count up from the bottom; image rows down from the top
    panels = []
    for ax, (key, _, _) in zip(axes, series):
        box = ax.get_window_extent()  # the axes as laid out by the draw that saved the file
        panels.append({"key": key, "box": tuple(map(float, (box.x0, height - box.y1, box.x1, height - box.y0))),
                       "x_range": tuple(map(float, ax.get_xlim())), "y_range": tuple(map(float, ax.get_ylim()))})
    return panels
