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
        ax.bar([x + (i - 1) * width for x in range(len(labels))], values, width, label={"codec": "dist_ckpt zstd-1",
               "zstd1_byte_grouped": "byte-grouped zstd-1", "zstd1_plain": "plain zstd-1"}[method])  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("stored / raw (lower is better)")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"Compression ratio per dtype ({path.name})")
    ax.legend(fontsize=8)
    return save(fig, results / "compression_ratio.png")


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
    return save(fig, results / "weak_scaling.png")


def plot_throughput(results: Path) -> Path | None:
    """Save/load throughput, local (bench_save) and S3 (bench_s3)."""
    bars: dict[str, float] = {}
    found = newest(results, "save")
    if found is not None:
        for label, value in _local_throughput(found[1]).items():
            bars[label] = value
    found = newest(results, "s3")
    if found is not None:
        r = found[1]["results"]
        bars["S3 upload\nours"] = r["upload_MBps"]["ours"]
        bars["S3 upload\nTransferManager"] = r["upload_MBps"]["transfer_manager"]
        bars["S3 download\nours"] = r["download_MBps"]["ours_read_ranges"]
        bars["S3 download\nTransferManager"] = r["download_MBps"]["transfer_manager"]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(bars)), list(bars.values()), color=["C0" if "ours" in k else "C7" for k in bars])
    ax.set_xticks(range(len(bars)), list(bars), fontsize=7)
    ax.set_ylabel("MB/s")
    ax.set_title("Save/load throughput: local disk (page cache) and S3 on loopback")
    return save(fig, results / "throughput.png")


def _local_throughput(doc: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    mb = doc.get("state_MB") or doc.get("mb") or doc.get("size_MB")
    times = doc.get("best_s") or doc.get("results") or {}
    if not mb or not isinstance(times, dict):
        return out
    for key, seconds in times.items():
        if isinstance(seconds, (int, float)) and seconds > 0:
            out[f"local\n{key.replace('_', ' ')}"] = mb / seconds
    return out


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
    return save(fig, results / "stall_vs_size.png")


def save(fig: Any, path: Path) -> Path:
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
