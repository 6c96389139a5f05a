"""Plots of the newest benchmark results (PNG under benchmarks/results/), written by `make bench`.

    python benchmarks/plots.py [--results benchmarks/results]

Each plot is drawn from the newest ``<date>-<name>.json`` of its benchmark; a benchmark with
no result yet is skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def newest(results: Path, name: str) -> tuple[Path, dict[str, Any]] | None:
    files = sorted(results.glob(f"*-{name}.json"))
    if not files:
        print(f"plots: no {name} result yet", file=sys.stderr)
        return None
    return files[-1], json.loads(files[-1].read_text())


def plot_compression(results: Path) -> Path | None:
    found = newest(results, "compress")
    if found is None:
        return None
    path, doc = found
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, series = [], {"codec": [], "zstd1_byte_grouped": [], "zstd1_plain": []}
    for data, by_dtype in doc["results"].items():
        for dtype, figures in by_dtype.items():
            labels.append(f"{data.replace('_', ' ')[:18]}\n{dtype}")
            for method in series:
                series[method].append(figures["per_core"][method]["ratio"])
    width = 0.27
    for i, (method, values) in enumerate(series.items()):
        ax.bar(
            [x + (i - 1) * width for x in range(len(labels))],
            values,
            width,
            label={
                "codec": "dist_ckpt zstd-1",
                "zstd1_byte_grouped": "byte-grouped zstd-1",
                "zstd1_plain": "plain zstd-1",
            }[method],
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("stored / raw (lower is better)")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"Compression ratio per dtype ({path.name})")
    ax.legend(fontsize=8)
    return save_png(fig, results / "compression_ratio.png")


def plot_scaling(results: Path) -> Path | None:
    found = newest(results, "scaling")
    if found is None:
        return None
    path, doc = found
    ranks = [r["world_size"] for r in doc["results"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [r["save_s"] for r in doc["results"]], "o-", label="save")
    ax.plot(ranks, [r["load_s"] for r in doc["results"]], "s-", label="load")
    ax.set_xticks(ranks)
    ax.set_xlabel("ranks")
    ax.set_ylabel("seconds (max over ranks)")
    ax.set_title(f"Weak scaling, {doc['mb_per_rank']} MB per rank, {doc['cpu_cores']} CPU cores")
    ax.legend()
    return save_png(fig, results / "weak_scaling.png")


def plot_throughput(results: Path) -> Path | None:
    """Save/load throughput: local disk (bench_save) and S3 on loopback (bench_s3), side by side."""
    save, s3 = newest(results, "save"), newest(results, "s3")
    if save is None and s3 is None:
        return None
    fig, (local_ax, s3_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if save is not None:
        r = save[1]["results"]
        names = [n for n in ("ours", "raw", "dcp", "torch") if n in r]
        for i, op in enumerate(("save", "load")):
            local_ax.bar(
                [x + (i - 0.5) * 0.4 for x in range(len(names))],
                [r[n][f"{op}_GBps"] * 1000 for n in names],
                0.4,
                label=op,
            )
        local_ax.set_xticks(
            range(len(names)),
            [{"raw": "raw write/read", "dcp": "DCP", "torch": "torch.save/load"}.get(n, n) for n in names],
        )
        local_ax.set_ylabel("MB/s")
        local_ax.set_title(f"local disk, {save[1]['config']['mb']} MB (page cache, fsync on save)", fontsize=9)
        local_ax.legend()
    if s3 is not None:
        r = s3[1]["results"]
        bars = {
            "upload\nours": r["upload_MBps"]["ours"],
            "upload\nTransferManager": r["upload_MBps"]["transfer_manager"],
            # results before 2026-11-26 measured read_ranges (since dropped) instead of read_into
            "download\nours": r["download_MBps"].get("ours_read_into", r["download_MBps"].get("ours_read_ranges")),
            "download\nTransferManager": r["download_MBps"]["transfer_manager"],
        }
        s3_ax.bar(range(len(bars)), list(bars.values()), color=["C0" if "ours" in k else "C7" for k in bars])
        s3_ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
        s3_ax.set_ylabel("MB/s")
        s3_ax.set_title(f"S3 on loopback (SeaweedFS), {s3[1].get('size_MiB', '?')} MiB", fontsize=9)
    return save_png(fig, results / "throughput.png")


def plot_stall(results: Path) -> Path | None:
    found = newest(results, "async_sweep")
    if found is None:
        return None
    path, doc = found
    sizes = doc["stall_vs_size"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for series, points in sizes.items():
        xs = sorted(points, key=float)
        ax.plot([float(x) for x in xs], [points[x] for x in xs], "o-", label=series)
    ax.set_xlabel("state size per rank (MB)")
    ax.set_ylabel("training stall per save (s)")
    ax.set_yscale("log")
    ax.set_title(f"Async save stall vs state size ({path.name})")
    ax.legend(fontsize=8)
    return save_png(fig, results / "stall_vs_size.png")


def save_png(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    for plot in (plot_compression, plot_scaling, plot_throughput, plot_stall):
        out = plot(args.results)
        if out is not None:
            print(out)


if __name__ == "__main__":
    main()
