"""``split_float`` (layouts 1 and 2) and its inverses for BF16 and F32 as fused loops compiled
by numba.

Byte-for-byte the same streams as the numpy reference in ``byte_group`` (tests compare both,
and the codec writes the same chunks either way). Why compiled: the numpy version makes ~20
passes over each chunk (every shift, mask and OR is a pass), which cost more than zstd itself
on decode (2.7 ms vs 1.8 ms for a 4 MiB BF16 chunk). No byte-shuffle library covers this
transform — blosc2 and numcodecs shuffle whole bytes, and this one splits the exponent and
mantissa at bit boundaries — and torch's ops are passes too. One fused loop per direction
reads and writes each byte once: ~0.7 ms for the same chunk. The BF16 layout-2 merge instead
runs three simple passes per L1-sized block, which LLVM vectorizes fully (~0.35 ms).

numba is a PyPI wheel (numba + llvmlite, no compiler needed). The kernels (``float_kernels``)
are imported on the first chunk, not with this module (importing numba takes ~0.8 s), compiled
then and cached on disk (``cache=True``). They release the GIL (``nogil``), so the codec's
thread pool runs them in parallel. Where numba is not installed, ``AVAILABLE`` is False and the
codec keeps the numpy path.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

AVAILABLE = importlib.util.find_spec("numba") is not None  # the codec reads this (tests may clear it)
if not AVAILABLE:
    log.debug("numba is not installed: split_float/merge_float use the numpy path (~1/3 the speed)")

_kernels: ModuleType | None = None
_kernels_lock = threading.Lock()


def _k() -> ModuleType:
    """The compiled kernels, imported once (the pool's threads may ask at the same time)."""
    global _kernels
    if _kernels is None:
        with _kernels_lock:
            if _kernels is None:
                from dist_ckpt.format import float_kernels

                _kernels = float_kernels
    return _kernels


_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def _as_u64(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole 8-byte words of ``joint`` and a flag byte per block of them, for the escape scan."""
    whole = joint[: joint.size - joint.size % 8]
    words = np.frombuffer(whole, dtype=np.uint64) if whole.size else np.zeros(0, np.uint64)
    return words, np.empty(words.size // _k().BLOCK_WORDS, np.uint8)


_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _as(data: np.ndarray, width: int, count: int | None = None) -> np.ndarray:
    """The first ``count`` ``width``-byte words of uint8 ``data`` (default: every whole word),
    for kernels that handle four elements per step."""
    if count is None:
        count = data.size // width
    whole = data[: count * width]
    return np.frombuffer(whole, dtype=_UINT[width]) if count else np.zeros(0, _UINT[width])


# (first escaped symbol, the code bits of every byte of a u64, the top code bit of every byte)
_ESCAPES = {
    1: (240, np.uint64(0xF0F0F0F0F0F0F0F0), np.uint64(0x8080808080808080)),
    2: (60, np.uint64(0x3C3C3C3C3C3C3C3C), np.uint64(0x2020202020202020)),
}
_EXPONENT = {2: (0x807F, 7), 4: (0x807FFFFF, 23)}  # (mask clearing the exponent, its shift)


def split_float(data: np.ndarray, itemsize: int, work) -> tuple[int, list[np.ndarray]]:  # noqa: ANN001
    """Same contract as ``byte_group.split_float`` (layout 1; the streams live in ``work``)."""
    words = data.view(_WORD[itemsize])
    n = words.size
    joint, packed, escapes = work.get("joint", n), work.get("packed", (n + 1) // 2), work.get("escapes", n)
    base, count = _k().split(words, 8 * itemsize - 16, joint, *_as_u64(joint), packed, escapes)
    planes: list[np.ndarray] = []
    if itemsize == 4:
        planes = [work.get("p0", n), work.get("p1", n)]
        _k().planes_f32(words, planes[0], planes[1])
    return int(base), [joint, escapes[:count], *planes, packed]


def split_float6(data: np.ndarray, itemsize: int, work) -> tuple[int, list[np.ndarray]]:  # noqa: ANN001
    """Same contract as ``byte_group.split_float6`` (the streams live in ``work``)."""
    words = data.view(_WORD[itemsize])
    n = words.size
    symbols, nibbles, quads = work.get("sym", n), work.get("nib", (n + 1) // 2), work.get("quads", (n + 3) // 4)
    escapes = work.get("escapes", n)
    base, count = _k().split6(
        words, 8 * itemsize - 16, symbols, _as(symbols, 4), *_as_u64(symbols), nibbles, _as(nibbles, 2), quads, escapes
    )
    planes: list[np.ndarray] = []
    if itemsize == 4:
        planes = [work.get("p0", n), work.get("p1", n)]
        _k().planes_f32(words, planes[0], planes[1])
    return int(base), [symbols, escapes[:count], *planes, nibbles, quads]


def _fix_escapes(layout: int, symbols: np.ndarray, escapes: np.ndarray, words: np.ndarray, itemsize: int) -> int:
    first, code_bits, probe = _ESCAPES[layout]
    symbols64, flags = _as_u64(symbols)
    _k().escape_blocks(symbols64, flags, code_bits, probe)
    return int(_k().fix_escapes(symbols, flags, first, escapes, words, *_EXPONENT[itemsize]))


def merge_float6(base: int, streams: list[np.ndarray], itemsize: int, out: np.ndarray) -> int:
    """Inverse of :func:`split_float6` into ``out`` (uint8, n*itemsize). Returns the number of
    escapes the symbols call for, or -1 when that exceeds the escape stream: the caller
    compares it with the escape stream's length (a mismatch means damaged data)."""
    symbols, escapes, *planes, nibbles, quads = streams
    if itemsize == 2:  # one call, escapes included (its Python-side cost shows on small tensors)
        return int(_k().merge6_bf16(base, symbols, escapes, nibbles, quads, out))
    words = out.view(_WORD[itemsize])
    _k().merge6_f32(base, symbols, _as(symbols, 4), nibbles, _as(nibbles, 2), quads, planes[0], planes[1], words)
    return _fix_escapes(2, symbols, escapes, words, itemsize)


def merge_float(base: int, streams: list[np.ndarray], itemsize: int, out: np.ndarray) -> int:
    """Layout 1 (chunk format 1, read only): inverse of ``byte_group.split_float``, as
    :func:`merge_float6`."""
    joint, escapes, *planes, packed = streams
    words = out.view(_WORD[itemsize])
    if itemsize == 2:
        pairs = joint.size // 2
        joint16 = np.frombuffer(joint[: 2 * pairs], dtype=np.uint16) if pairs else np.zeros(0, np.uint16)
        _k().merge_bf16(base, joint, joint16, packed, words, out[: 4 * pairs].view(np.uint32))
    else:
        _k().merge_f32(base, joint, planes[0], planes[1], packed, words)
    return _fix_escapes(1, joint, escapes, words, itemsize)
