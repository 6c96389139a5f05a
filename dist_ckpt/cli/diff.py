"""``dist-ckpt diff CKPT_A CKPT_B``: keys added/removed/changed, config changes, value differences."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.cli.common import checkpoint_at, fmt_number, print_json, progress_bar, table
from dist_ckpt.config import config_changes
from dist_ckpt.format.metadata_json import CheckpointMetadata
from dist_ckpt.progress import KEY

if TYPE_CHECKING:  # torch only for --values (comparing content)
    import torch

EPILOG = """\
Compares structure (keys, shapes, dtypes, tensor vs value) and the run config snapshot; with
--values also the content: max absolute difference per tensor, equality per stored value.
Exit status 0 when nothing differs, 1 when something does (like diff(1)).

examples:
  dist-ckpt diff /data/runs/exp1/step_000001000 /data/runs/exp1/step_000002000
  dist-ckpt diff /data/runs/exp1/step_000001000 s3://bucket/runs/exp1/step_000001000 --values
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="compare two checkpoints",
        description="Compare two checkpoints: keys added, removed or changed in shape/dtype, "
        "config changes, and with --values the max abs difference per tensor.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="CKPT_A", help="first checkpoint folder: a path or s3:// URI")
    p.add_argument("b", metavar="CKPT_B", help="second checkpoint folder: a path or s3:// URI")
    p.add_argument("--values", action="store_true", help="also compare content (reads both checkpoints fully)")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.set_defaults(func=run)


def _signatures(meta: CheckpointMetadata) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in meta.keys():
        md = meta.tensors.get(key)
        if md is None:
            out[key] = {"kind": "value", "dtype": None, "shape": None}
        else:
            out[key] = {"kind": "tensor", "dtype": md.dtype, "shape": list(md.size)}
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` (NaN where exactly one side is NaN; positions NaN on both sides agree)."""
    import torch

    from dist_ckpt.export import iter_tensor_blocks

    worst = 0.0
    for x, y in iter_tensor_blocks(a, b):
        d = (x - y).abs()
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = torch.where(both_nan | (x == y), torch.zeros_like(d), d)  # inf == inf agrees too
        if d.numel():
            if torch.isnan(d).any():
                return float("nan")
            worst = max(worst, float(d.max()))
    return worst


def compare(va: CheckpointView, vb: CheckpointView, values: bool, on_bytes: Any = None) -> dict[str, Any]:
    sa, sb = _signatures(va.meta), _signatures(vb.meta)
    added = sorted(set(sb) - set(sa))
    removed = sorted(set(sa) - set(sb))
    changed = [{"key": k, "a": sa[k], "b": sb[k]} for k in sorted(set(sa) & set(sb)) if sa[k] != sb[k]]
    pa, pb = va.progress(), vb.progress()
    doc: dict[str, Any] = {
        "a": {"uri": va.uri, "step": pa.step if pa else None, "metrics": dict(pa.metrics) if pa else {}},
        "b": {"uri": vb.uri, "step": pb.step if pb else None, "metrics": dict(pb.metrics) if pb else {}},
        "added": [{"key": k, **sb[k]} for k in added],
        "removed": [{"key": k, **sa[k]} for k in removed],
        "changed": changed,
        "same_structure": sum(1 for k in set(sa) & set(sb) if sa[k] == sb[k]),
        "config_changes": config_changes(pa.config if pa else None, pb.config if pb else None),
    }
    if values:
        tensors, vals = [], []
        for k in sorted(set(sa) & set(sb)):
            if sa[k] != sb[k] or k == KEY:
                continue
            if sa[k]["kind"] == "tensor":
                ta, tb = va.tensor(k), vb.tensor(k)
                tensors.append({"key": k, "max_abs_diff": max_abs_diff(ta, tb)})
                if on_bytes is not None:
                    on_bytes(ta.nbytes + tb.nbytes)
                del ta, tb
            else:
                vals.append({"key": k, "equal": va.raw_value(k) == vb.raw_value(k)})
        doc["tensors"], doc["values"] = tensors, vals
    return doc


def differs(doc: dict[str, Any]) -> bool:
    if doc["added"] or doc["removed"] or doc["changed"] or doc["config_changes"]:
        return True
    return any(t["max_abs_diff"] != 0 for t in doc.get("tensors", [])) or any(
        not v["equal"] for v in doc.get("values", [])
    )


def _fmt_sig(s: dict[str, Any]) -> str:
    return "value" if s["kind"] == "value" else f"{s['dtype']} {list(s['shape'])}"


def run(args: argparse.Namespace) -> int:
    va, vb = CheckpointView(*checkpoint_at(args.a)), CheckpointView(*checkpoint_at(args.b))
    total = 0
    if args.values:
        total = sum(r.size for r in va.meta.files.values()) + sum(r.size for r in vb.meta.files.values())
    with progress_bar(args, "diff", total) as bar:
        doc = compare(va, vb, args.values, bar.update)
    doc["differ"] = differs(doc)
    if args.json:
        print_json(doc)
        return 1 if doc["differ"] else 0
    print(f"--- {va.uri} (step {doc['a']['step']})")
    print(f"+++ {vb.uri} (step {doc['b']['step']})")
    print(
        f"keys: {len(doc['added'])} added, {len(doc['removed'])} removed, {len(doc['changed'])} changed, "
        f"{doc['same_structure']} same"
    )
    for e in doc["added"]:
        print(f"+ {e['key']}  {_fmt_sig(e)}")
    for e in doc["removed"]:
        print(f"- {e['key']}  {_fmt_sig(e)}")
    for e in doc["changed"]:
        print(f"~ {e['key']}  {_fmt_sig(e['a'])} -> {_fmt_sig(e['b'])}")
    ma, mb = doc["a"]["metrics"], doc["b"]["metrics"]
    if ma or mb:
        pairs = (f"{k} {fmt_number(ma.get(k, '-'))} -> {fmt_number(mb.get(k, '-'))}" for k in sorted(set(ma) | set(mb)))
        print("metrics: " + ", ".join(pairs))
    if doc["config_changes"]:
        print(f"config: {len(doc['config_changes'])} changes")
        for line in doc["config_changes"]:
            print(f"  {line}")
    else:
        print("config: no changes")
    if args.values:
        diff_t = [t for t in doc["tensors"] if t["max_abs_diff"] != 0]
        print(f"tensors: {len(doc['tensors']) - len(diff_t)} identical, {len(diff_t)} differ")
        if diff_t:
            rows = [(t["key"], fmt_number(t["max_abs_diff"])) for t in diff_t]
            print("\n".join("  " + line for line in table(("KEY", "MAX ABS DIFF"), rows, right=(1,)).splitlines()))
        diff_v = [v["key"] for v in doc["values"] if not v["equal"]]
        listed = f": {', '.join(diff_v)}" if diff_v else ""
        print(f"values: {len(doc['values']) - len(diff_v)} equal, {len(diff_v)} differ{listed}")
    print("checkpoints differ" if doc["differ"] else "no differences")
    return 1 if doc["differ"] else 0
