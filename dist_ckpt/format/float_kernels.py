"""The numba kernels behind ``float_jit`` (imported on first use: importing numba takes ~0.8 s,
which a process that never encodes or decodes a float chunk should not pay).

Bit layout (see ``byte_group``): a word is ``sign | e7..e0 | mantissa``; its top 16 bits are
``sign e7..e1`` and ``e0 m_top7``. ``joint = code << 4 | m_top7 >> 3 & 15`` with ``code = e -
base`` or 15 (escaped), ``nibble = sign << 3 | m_top7 & 7`` (two per byte, the first element in
the high nibble); the lower bytes of an F32 are byte planes.
"""

from __future__ import annotations

import numba
import numpy as np

_HIST_SAMPLE = 65536  # as byte_group: the exponent window comes from a sample
_WINDOW = 15
BLOCK_WORDS = 8  # the escape scan flags 8-word (64-byte) blocks of the joint stream

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)
U8, U16, U32, U64 = np.uint8, np.uint16, np.uint32, np.uint64


@_jit
def _exponent_window(hist: np.ndarray) -> int:
    """Lowest exponent of the 15 consecutive ones holding most samples (first maximum)."""
    best, best_at = -1, 0
    for start in range(256 - _WINDOW + 1):
        total = 0
        for k in range(start, start + _WINDOW):
            total += hist[k]
        if total > best:
            best, best_at = total, start
    return best_at


@_jit
def split(
    words: np.ndarray,
    shift: int,
    joint: np.ndarray,
    joint64: np.ndarray,
    flags: np.ndarray,
    packed: np.ndarray,
    escapes: np.ndarray,
) -> tuple:
    """One pass computing ``joint`` and ``packed`` from the top 16 bits of each word
    (``words >> shift``), then the escape compaction. Returns (base, escape count)."""
    n = words.size
    hist = np.zeros(256, np.int64)
    step = max(1, n // _HIST_SAMPLE)
    for i in range(0, n, step):
        top = U32(words[i]) >> U32(shift)
        hist[((top >> U32(7)) & U32(255))] += 1
    base = _exponent_window(hist) if n else 0
    b = U32(base)
    m = n // 2
    for i in range(m):
        t0 = U32(words[2 * i]) >> U32(shift)
        t1 = U32(words[2 * i + 1]) >> U32(shift)
        c0 = ((t0 >> U32(7)) - b) & U32(255)
        c1 = ((t1 >> U32(7)) - b) & U32(255)
        c0 = min(c0, U32(15))
        c1 = min(c1, U32(15))
        joint[2 * i] = U8((c0 << U32(4)) | ((t0 >> U32(3)) & U32(15)))
        joint[2 * i + 1] = U8((c1 << U32(4)) | ((t1 >> U32(3)) & U32(15)))
        n0 = ((t0 >> U32(12)) & U32(8)) | (t0 & U32(7))
        n1 = ((t1 >> U32(12)) & U32(8)) | (t1 & U32(7))
        packed[i] = U8((n0 << U32(4)) | n1)
    if n % 2:
        t0 = U32(words[n - 1]) >> U32(shift)
        c0 = min(((t0 >> U32(7)) - b) & U32(255), U32(15))
        joint[n - 1] = U8((c0 << U32(4)) | ((t0 >> U32(3)) & U32(15)))
        packed[m] = U8((((t0 >> U32(12)) & U32(8)) | (t0 & U32(7))) << U32(4))
    escape_blocks(joint64, flags)
    k, span = 0, 8 * BLOCK_WORDS
    for blk in range((n + span - 1) // span):
        if blk < flags.size and flags[blk] == 0:
            continue
        for i in range(blk * span, min(n, (blk + 1) * span)):
            if joint[i] >= 240:
                escapes[k] = U8((U32(words[i]) >> U32(shift + 7)) & U32(255))
                k += 1
    return base, k


@_jit
def planes_f32(words: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> None:
    for i in range(words.size):
        w = words[i]
        p0[i] = U8(w & U32(255))
        p1[i] = U8((w >> U32(8)) & U32(255))


@_jit
def _top16(j: int, v: int, b: int) -> int:
    """The top 16 bits of a word from its joint byte and its nibble (exponent not escaped)."""
    return ((((j >> 4) + b) & 255) << 7) | ((j & 15) << 3) | (v & 7) | ((v >> 3) << 15)


@_jit
def escape_blocks(joint64: np.ndarray, flags: np.ndarray) -> None:
    """flags[b] = 1 where one of the joint bytes of block b holds an escape (high
    nibble 15). A branch-free OR over the words of each block: it vectorizes, so the rare
    escapes cost a scan of bytes only in the blocks that hold them."""
    blocks = joint64.size // BLOCK_WORDS
    for blk in range(blocks):
        acc = U64(0)
        for w in range(blk * BLOCK_WORDS, (blk + 1) * BLOCK_WORDS):
            t = joint64[w] & U64(0xF0F0F0F0F0F0F0F0)
            acc |= t & (t << U64(1)) & (t << U64(2)) & (t << U64(3))
        flags[blk] = U8(1) if (acc & U64(0x8080808080808080)) != U64(0) else U8(0)


@_jit
def fix_escapes(
    joint: np.ndarray, flags: np.ndarray, escapes: np.ndarray, out: np.ndarray, mask: int, shift: int
) -> int:
    """Write the escaped exponents into ``out``; returns how many joint bytes are escapes,
    or -1 where there are more than ``escapes`` holds (the caller reports corruption)."""
    n, k, span = joint.size, 0, 8 * BLOCK_WORDS
    for blk in range((n + span - 1) // span):
        if blk < flags.size and flags[blk] == 0:
            continue
        for i in range(blk * span, min(n, (blk + 1) * span)):
            if joint[i] >= 240:
                if k >= escapes.size:
                    return -1
                out[i] = (out[i] & mask) | (escapes[k] << shift)
                k += 1
    return k


@_jit
def merge_bf16(
    base: int, joint: np.ndarray, joint16: np.ndarray, packed: np.ndarray, out: np.ndarray, out32: np.ndarray
) -> None:
    """Two elements per step, in 32-bit lanes (``joint16``/``out32``: the same bytes as
    ``joint``/``out`` seen as pairs): contiguous loads and stores that LLVM vectorizes."""
    n, b = joint.size, U32(base)
    m = n // 2
    for i in range(m):
        p, jp = U32(packed[i]), U32(joint16[i])
        j0, j1 = jp & U32(255), jp >> U32(8)
        v0, v1 = p >> U32(4), p & U32(15)
        e0, e1 = ((j0 >> U32(4)) + b) & U32(255), ((j1 >> U32(4)) + b) & U32(255)
        w0 = (e0 << U32(7)) | ((j0 & U32(15)) << U32(3)) | (v0 & U32(7)) | ((v0 >> U32(3)) << U32(15))
        w1 = (e1 << U32(7)) | ((j1 & U32(15)) << U32(3)) | (v1 & U32(7)) | ((v1 >> U32(3)) << U32(15))
        out32[i] = w0 | (w1 << U32(16))
    if n % 2:
        out[n - 1] = U16(_top16(U32(joint[n - 1]), U32(packed[m]) >> U32(4), b))


@_jit
def merge_f32(
    base: int, joint: np.ndarray, p0: np.ndarray, p1: np.ndarray, packed: np.ndarray, out: np.ndarray
) -> None:
    n, b = joint.size, U32(base)
    m = n // 2
    for i in range(m):
        p = U32(packed[i])
        a, c = 2 * i, 2 * i + 1
        out[a] = (_top16(U32(joint[a]), p >> U32(4), b) << U32(16)) | (U32(p1[a]) << U32(8)) | U32(p0[a])
        out[c] = (_top16(U32(joint[c]), p & U32(15), b) << U32(16)) | (U32(p1[c]) << U32(8)) | U32(p0[c])
    if n % 2:
        a = n - 1
        top = _top16(U32(joint[a]), U32(packed[m]) >> U32(4), b)
        out[a] = (top << U32(16)) | (U32(p1[a]) << U32(8)) | U32(p0[a])
