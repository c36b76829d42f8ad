"""PNG plots for `kat eval` and the demo report (matplotlib's Agg canvas, no display needed).

`python -c "from kat_megatron.eval.plots import bars_by_mode; bars_by_mode({'auto': {'easy':
{'accuracy': 0.9}}}, 'accuracy', 'acc.png')"` writes one grouped bar chart.

Figures are built with `matplotlib.figure.Figure` (no pyplot global state), so plotting works in
any process, headless, without selecting a backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODE_ORDER = ("think_off", "auto", "think_on")
"""Bar order: the cheap forced mode, the model's choice, the expensive forced mode."""


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def ordered_modes(modes: Sequence[str]) -> list[str]:
    """`modes` in MODE_ORDER first, then any others in their given order."""
    return [m for m in MODE_ORDER if m in modes] + [m for m in modes if m not in MODE_ORDER]


def bars_by_mode(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    metric: str,
    path: str | os.PathLike,
    ylabel: str | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Grouped bars: one group per category (as in `summary[mode]`), one bar per mode.

    `summary` is `{mode: {category: {metric: value}}}` (`metrics.summarize`'s output).
    """
    import numpy as np

    modes = ordered_modes(list(summary))
    categories = list(dict.fromkeys(c for m in modes for c in summary[m]))
    fig, ax = _figure()
    width = 0.8 / max(len(modes), 1)
    x = np.arange(len(categories))
    for i, mode in enumerate(modes):
        values = [float(summary[mode].get(c, {}).get(metric, np.nan)) for c in categories]
        bars = ax.bar(x + (i - (len(modes) - 1) / 2) * width, values, width, label=mode)
        ax.bar_label(bars, fmt="%.2g", fontsize=7, padding=1)
    ax.set_xticks(x, categories)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or f"{ylabel or metric} by mode and category")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return _save(fig, path)


def lines_over_steps(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | os.PathLike,
    step_key: str = "step",
    ylabel: str = "",
    title: str = "",
) -> Path | None:
    """One line per key of `keys` present in `rows` (rows lacking a key are skipped for that
    line); None, and no file, when no key has a value."""
    fig, ax = _figure()
    drawn = 0
    for key in keys:
        pts = [(r[step_key], r[key]) for r in rows if key in r and r[key] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(pts) < 50 else None, label=key)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel(step_key)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


ROUTER_MARKERS = {"think_off": "s", "think_on": "^", "oracle": "*", "auto": "o"}


def frontier_plot(
    front: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | os.PathLike
) -> Path:
    """Accuracy against mean output tokens, one panel per group of `front` (`metrics.frontier`'s
    output: `{category: {router: {accuracy, tokens_mean, ...}}}`), one marker per router."""
    from matplotlib.figure import Figure

    groups = list(front)
    cols = min(len(groups), 3)
    rows = -(-len(groups) // cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, group in zip(axes, groups):
        for router, row in front[group].items():
            # hollow markers of decreasing size: coinciding points stay visible
            i = list(ROUTER_MARKERS).index(router) if router in ROUTER_MARKERS else 4
            color = f"C{i}"
            ax.scatter([float(row["tokens_mean"])], [float(row["accuracy"])], s=120 - 25 * i,
                       marker=ROUTER_MARKERS.get(router, "x"), facecolors="none",
                       edgecolors=color, linewidths=1.5, label=router)  # fmt: skip
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("mean output tokens", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(-0.05, 1.1)
        ax.margins(x=0.25)
        ax.grid(alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, path)
