"""Figures of a simulation report (matplotlib, Agg backend, PNG).

* ``mfu_vs_world.png`` — attention MFU against world size, one line per strategy.
* ``rank_loads.png`` — per-rank compute time of one batch (largest world size), one panel per strategy.
* ``timeline.png`` — one fcp rank's forward and backward: compute vs communication per stage.
* ``block_sweep.png`` — fcp's attention MFU and kernel efficiency against block size (sweep reports).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runner import Report, Row

COLORS = {"fcp": "#d62728", "ring": "#1f77b4", "allgather": "#9467bd", "bytescale": "#2ca02c", "wlb": "#ff7f0e",
          "magi": "#8c564b", "packing": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: Report) -> str:
    s = report.settings
    return f"{s.distribution.name} · {s.model.name} · {s.cluster.name} · {s.tokens_per_rank // 1024}K tokens/rank"


def plot_mfu_vs_world(report: Report, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r.strategy for r in report.rows):
        rows = sorted((r for r in report.rows if r.strategy == name), key=lambda r: r.world_size)
        ax.plot([r.world_size for r in rows], [100 * r.attention_mfu for r in rows], marker="o", label=name,
                color=COLORS.get(name), linewidth=2.5 if name == "fcp" else 1.5)
    ax.set_xscale("log", base=2)
    sizes = sorted({r.world_size for r in report.rows})
    ax.set_xticks(sizes, [str(w) for w in sizes])
    ax.set_xlabel("GPUs (world size)")
    ax.set_ylabel("attention MFU (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    ax.set_title(_title(report), fontsize=9)
    return _save(fig, path)


def plot_rank_loads(report: Report, path: Path) -> Path:
    plt = _pyplot()
    loads = report.example.rank_compute_s
    fig, axes = plt.subplots(len(loads), 1, figsize=(7.0, 1.3 * len(loads) + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (name, load) in zip(axes[:, 0], loads.items()):
        ms = 1e3 * np.asarray(load)
        ax.bar(np.arange(len(ms)), ms, width=1.0, color=COLORS.get(name))
        ax.axhline(ms.mean(), color="black", linestyle="--", linewidth=0.8)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.text(0.995, 0.9, f"max/mean {ms.max() / ms.mean():.2f}", transform=ax.transAxes, ha="right", va="top",
                fontsize=8)
    axes[-1, 0].set_xlabel(f"rank (one batch, {report.example.world_size} GPUs): attention compute ms, fwd + bwd")
    fig.suptitle(_title(report), fontsize=9)
    return _save(fig, path)


def plot_timeline(report: Report, path: Path) -> Path:
    plt = _pyplot()
    ex = report.example
    fig, ax = plt.subplots(figsize=(8.0, 2.6))
    lanes = {("fwd", "comm"): 3, ("fwd", "compute"): 2, ("bwd", "comm"): 1, ("bwd", "compute"): 0}
    colors = {"comm": "#1f77b4", "compute": "#d62728"}
    for phase, kind, start, end, _ in ex.trace:
        ax.broken_barh([(1e3 * start, 1e3 * (end - start))], (lanes[(phase, kind)] - 0.4, 0.8),
                       facecolors=colors[kind], edgecolors="white", linewidth=0.3)
    ax.set_yticks(list(lanes.values()), [f"{p} {k}" for p, k in lanes])
    ax.set_xlabel("ms (one attention layer)")
    ax.set_title(f"fcp, rank {ex.trace_rank} of {ex.world_size} (the last to finish): stages of compute and "
                 f"communication", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_block_sweep(report: Report, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for i, w in enumerate(sorted({r.world_size for r in report.rows})):
        rows: list[Row] = sorted((r for r in report.rows if r.world_size == w), key=lambda r: r.block_size)
        x, color = [r.block_size for r in rows], f"C{i}"
        ax1.plot(x, [100 * r.attention_mfu for r in rows], marker="o", color=color, label=f"{w} GPUs")
        ax2.plot(x, [100 * r.kernel_efficiency for r in rows], marker="o", color=color,
                 label=f"kernel efficiency, {w} GPUs")
        ax2.plot(x, [100 * r.exposed_comm_ms / r.step_ms for r in rows], marker="x", linestyle="--", color=color,
                 label=f"exposed comm / step, {w} GPUs")
    sizes = sorted({r.block_size for r in report.rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{b // 1024}K" if b >= 1024 else str(b) for b in sizes])
        ax.set_xlabel("fcp block size (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_ylabel("attention MFU (%)")
    ax2.set_ylabel("% (of peak / of step time)")
    ax2.set_ylim(bottom=0)
    fig.suptitle(_title(report), fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_plots(report: Report, directory: str | Path, prefix: str = "") -> list[Path]:
    """Write the report's figures into ``directory`` (created if needed); returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if report.settings.block_sizes:
        return [plot_block_sweep(report, out / f"{prefix}block_sweep.png")]
    paths = [plot_mfu_vs_world(report, out / f"{prefix}mfu_vs_world.png")]
    if report.example is not None and report.example.rank_compute_s:
        paths.append(plot_rank_loads(report, out / f"{prefix}rank_loads.png"))
    if report.example is not None and report.example.trace:
        paths.append(plot_timeline(report, out / f"{prefix}timeline.png"))
    return paths
