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


def _curve_panels(rows: list[dict], max_sets: int = 2) -> list[tuple[str, str]]:
    """(metrics key, axis label) to draw: training loss, then validation loss and accuracy of the
    first `max_sets` evaluation sets logged (text: "val"; synthetic tasks: "lenL")."""
    keys = list(dict.fromkeys(k for r in rows for m in r.get("_metrics", ()) for k in m if k.startswith("eval/")))
    sets = list(dict.fromkeys(k.split("/")[1] for k in keys))[:max_sets]
    panels = [("loss", "training loss (nats, one batch)")]
    for name in sets:
        panels += [(f"eval/{name}/{m}", f"validation {m} ({name})") for m in ("loss", "accuracy") if f"eval/{name}/{m}" in keys]
    return panels


def learning_curves(rows: list[dict], path: Path, title: str) -> bool:
    """Metric vs training tokens, one line per cell (mean over its seeds at the steps every seed
    logged), shaded from the lowest to the highest seed. rows: report.collect_runs rows (their
    "_metrics"). Returns False (and draws nothing) when no run logged anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in rows if r.get("_metrics")]
    if not runs:
        return False
    from matplotlib.ticker import EngFormatter

    panels = _curve_panels(runs)
    cells = list(dict.fromkeys(r["base"] for r in runs))
    colors = plt.get_cmap("tab20" if len(cells) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for i, cell in enumerate(cells):
            seeds = [{m["tokens"]: m[key] for m in r["_metrics"] if m.get(key) is not None and "tokens" in m}
                     for r in runs if r["base"] == cell]
            common = sorted(set.intersection(*(set(s) for s in seeds))) if seeds else []
            if not common:
                continue
            values = np.array([[s[t] for t in common] for s in seeds], dtype=float)
            color = colors(i % colors.N)
            ax.plot(common, values.mean(axis=0), color=color, label=cell if ax is axes[0][0] else None, lw=1.2)
            if len(seeds) > 1:
                ax.fill_between(common, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)
        ax.set(xlabel="training tokens", ylabel=label)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
