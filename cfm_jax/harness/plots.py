"""Small matplotlib helpers for experiment files: one line per group, x against y, with std bars."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def parse_cell(name: str) -> dict[str, str]:
    """'attention-d64-L128' -> {'kind': 'attention', 'd': '64', 'L': '128'} (leading letters = key)."""
    kind, *parts = name.split("-")
    out = {"kind": kind}
    for part in parts:
        key = part.rstrip("0123456789.e")
        out[key or "value"] = part[len(key):]
    return out


def grouped_lines(table: list[dict], x: Callable[[dict], float | None], y: Callable[[dict], float | None],
                  group: Callable[[dict], str], path: Path, xlabel: str, ylabel: str, title: str,
                  logx: bool = False, ystd: Callable[[dict], float | None] | None = None, panels: Callable[[dict], str] | None = None) -> None:
    """One subplot per panel value, one line per group; points without x or y are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_names = list(dict.fromkeys(panels(r) for r in table)) if panels else [""]
    fig, axes = plt.subplots(1, len(panel_names), figsize=(5 * len(panel_names), 4), squeeze=False)
    for ax, panel in zip(axes[0], panel_names):
        rows = [r for r in table if not panels or panels(r) == panel]
        for name in dict.fromkeys(group(r) for r in rows):
            pts = sorted((x(r), y(r), ystd(r) if ystd else None) for r in rows
                         if group(r) == name and x(r) is not None and y(r) is not None)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=[e or 0 for e in es] if ystd else None, marker="o", capsize=2, label=name)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title} {panel}".strip())
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
