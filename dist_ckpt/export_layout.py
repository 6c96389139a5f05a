"""The Hugging Face file layout that ``dist-ckpt export`` writes, and size parsing — no torch,
so the command line's ``--help`` and argument checks start without importing it."""

from __future__ import annotations

import re

from dist_ckpt.errors import ConfigError

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # --dtype choices; dist_ckpt.export.DTYPES maps them to torch dtypes
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"  # what transformers' from_pretrained reads beside the weights
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹, ``"500MiB"``, ``"1048576"``, ``"2.5G"`` (as Hugging Face reads them)."""
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(
            f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 5GB"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value
