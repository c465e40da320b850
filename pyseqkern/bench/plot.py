"""--plot: one panel per op family, a bar per case showing the speedup over torch (log scale), the
issue's target as a tick, and the share of the machine's peak written beside the bar."""
from __future__ import annotations

from .report import Result


def write_plot(path: str, results: list[Result], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'pyseqkern[bench]'") from exc

    families: dict[str, list[Result]] = {}
    for r in results:
        if r.speedup is not None:
            families.setdefault(r.family, []).append(r)
    if not families:
        raise SystemExit("--plot: no timed results to draw")
    heights = [max(1.5, 0.45 * len(rows) + 1.0) for rows in families.values()]
    fig, axes = plt.subplots(len(families), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = {"cpu": "#4C72B0", "cuda": "#55A868"}
    for ax, (family, rows) in zip(axes[:, 0], families.items()):
        labels = [f"{r.device}: {r.name}" for r in rows]
        ys = list(range(len(rows)))[::-1]
        speeds = [r.speedup for r in rows]
        ax.barh(ys, speeds, color=[colors.get(r.device, "gray") for r in rows], height=0.6)
        ax.set_xscale("log")
        ratio = FuncFormatter(lambda v, _: f"{v:g}x")
        ax.xaxis.set_major_formatter(ratio)
        ax.xaxis.set_minor_formatter(ratio)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.axvline(1.0, color="black", lw=1)
        for y, r in zip(ys, rows):
            text = f"{r.speedup:.2f}x"
            if r.pct_peak is not None:
                text += f"  ({r.pct_peak:.0f}% of peak)"
            ax.text(r.speedup * 1.03, y, text, va="center", fontsize=8)
            if r.target is not None:
                ax.plot([r.target], [y], marker="|", markersize=16, color="red" if not r.target_met else "black")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        lo = min(min(speeds), 0.5)
        hi = max(max(speeds), max((r.target or 0) for r in rows), 2.0)
        ax.set_xlim(lo / 1.5, hi * 3)
        ax.set_title(f"{family}: speedup over torch (bar), target (tick)", fontsize=10, loc="left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
