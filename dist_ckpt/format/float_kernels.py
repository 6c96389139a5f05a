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
def escape_blocks(joint64: np.ndarray, flags: np.ndarray, code_bits: int, probe: int) -> None:
    """flags[b] = 1 where one of the symbol bytes of block b holds an escape (its four code
    bits, ``code_bits`` in every byte, all set; ``probe`` is the top one of them in every
    byte). A branch-free OR over the words of each block: it vectorizes, so the rare escapes
    cost a scan of bytes only in the blocks that hold them."""
    blocks = joint64.size // BLOCK_WORDS
    mask, top = U64(code_bits), U64(probe)
    for blk in range(blocks):
        acc = U64(0)
        for w in range(blk * BLOCK_WORDS, (blk + 1) * BLOCK_WORDS):
            t = joint64[w] & mask
            acc |= t & (t << U64(1)) & (t << U64(2)) & (t << U64(3))
        flags[blk] = U8(1) if (acc & top) != U64(0) else U8(0)


@_jit
def fix_escapes(
    joint: np.ndarray, flags: np.ndarray, first: int, escapes: np.ndarray, out: np.ndarray, mask: int, shift: int
) -> int:
    """Write the escaped exponents into ``out`` (symbols >= ``first`` are escapes); returns
    how many there are, or -1 where there are more than ``escapes`` holds (the caller reports
    corruption)."""
    n, k, span = joint.size, 0, 8 * BLOCK_WORDS
    for blk in range((n + span - 1) // span):
        if blk < flags.size and flags[blk] == 0:
            continue
        for i in range(blk * span, min(n, (blk + 1) * span)):
            if joint[i] >= first:
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


# --- layout 2 (chunk format 2): a 6-bit symbol ``code << 2 | m_top2``, 2-bit quads ------------


@_jit
def _exponent_base(words: np.ndarray, shift: int) -> int:
    n = words.size
    hist = np.zeros(256, np.int64)
    step = max(1, n // _HIST_SAMPLE)
    for i in range(0, n, step):
        hist[(U32(words[i]) >> U32(shift + 7)) & U32(255)] += 1
    return _exponent_window(hist) if n else 0


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
    """Layout 1: one pass computing ``joint`` and ``packed`` from the top 16 bits of each word
    (``words >> shift``), then the escape compaction. Returns (base, escape count)."""
    n = words.size
    base = _exponent_base(words, shift)
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
    escape_blocks(joint64, flags, U64(0xF0F0F0F0F0F0F0F0), U64(0x8080808080808080))
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
def _split_one(t: int, b: int) -> tuple:
    """(symbol, quad, nibble) of one element from its top 16 bits ``t``."""
    code = min(((t >> U32(7)) - b) & U32(255), U32(15))
    return (code << U32(2)) | ((t >> U32(5)) & U32(3)), (t >> U32(3)) & U32(3), ((t >> U32(12)) & U32(8)) | (t & U32(7))


@_jit
def split6(
    words: np.ndarray,
    shift: int,
    symbols: np.ndarray,
    symbols32: np.ndarray,
    symbols64: np.ndarray,
    flags: np.ndarray,
    nibbles: np.ndarray,
    nibbles16: np.ndarray,
    quads: np.ndarray,
    escapes: np.ndarray,
) -> tuple:
    """Layout 2 of the top 16 bits of each word (``words >> shift``), four elements per step
    (``symbols32``/``nibbles16``: the same bytes as ``symbols``/``nibbles``, one u32/u16 per
    step), then the escape compaction. Returns (base, escape count)."""
    n = words.size
    base = _exponent_base(words, shift)
    b, sh = U32(base), U32(shift)
    for g in range(n // 4):
        s0, q0, n0 = _split_one(U32(words[4 * g]) >> sh, b)
        s1, q1, n1 = _split_one(U32(words[4 * g + 1]) >> sh, b)
        s2, q2, n2 = _split_one(U32(words[4 * g + 2]) >> sh, b)
        s3, q3, n3 = _split_one(U32(words[4 * g + 3]) >> sh, b)
        symbols32[g] = s0 | (s1 << U32(8)) | (s2 << U32(16)) | (s3 << U32(24))
        nibbles16[g] = U16((n0 << U32(4)) | n1 | (n2 << U32(12)) | (n3 << U32(8)))
        quads[g] = U8((q0 << U32(6)) | (q1 << U32(4)) | (q2 << U32(2)) | q3)
    for i in range(n - n % 4, n):
        sym, quad, nib = _split_one(U32(words[i]) >> sh, b)
        symbols[i] = U8(sym)
        if i % 4 == 0:
            quads[i // 4] = U8(0)
        quads[i // 4] |= U8(quad << U32(6 - 2 * (i % 4)))
        if i % 2 == 0:
            nibbles[i // 2] = U8(nib << U32(4))
        else:
            nibbles[i // 2] |= U8(nib)
    escape_blocks(symbols64, flags, U64(0x3C3C3C3C3C3C3C3C), U64(0x2020202020202020))
    k, span = 0, 8 * BLOCK_WORDS
    for blk in range((n + span - 1) // span):
        if blk < flags.size and flags[blk] == 0:
            continue
        for i in range(blk * span, min(n, (blk + 1) * span)):
            if symbols[i] >= 60:
                escapes[k] = U8((U32(words[i]) >> U32(shift + 7)) & U32(255))
                k += 1
    return base, k


@_jit
def _top16_6(sym: int, quad: int, nib: int, b: int) -> int:
    """The top 16 bits of a word from its layout-2 fields (exponent not escaped)."""
    e = ((sym >> U32(2)) + b) & U32(255)
    return (e << U32(7)) | ((sym & U32(3)) << U32(5)) | (quad << U32(3)) | (nib & U32(7)) | ((nib >> U32(3)) << U32(15))


@_jit
def _group_tops(sym: int, nib: int, q: int, b: int) -> tuple:
    """The top 16 bits of four elements from their symbols (a u32), nibbles (a u16) and quads."""
    t0 = _top16_6(sym & U32(255), (q >> U32(6)) & U32(3), (nib >> U32(4)) & U32(15), b)
    t1 = _top16_6((sym >> U32(8)) & U32(255), (q >> U32(4)) & U32(3), nib & U32(15), b)
    t2 = _top16_6((sym >> U32(16)) & U32(255), (q >> U32(2)) & U32(3), (nib >> U32(12)) & U32(15), b)
    t3 = _top16_6(sym >> U32(24), q & U32(3), (nib >> U32(8)) & U32(15), b)
    return t0, t1, t2, t3


@_jit
def _tail_top(i: int, symbols: np.ndarray, nibbles: np.ndarray, quads: np.ndarray, b: int) -> int:
    nib = (U32(nibbles[i // 2]) >> U32(4 * (1 - i % 2))) & U32(15)
    return _top16_6(U32(symbols[i]), (U32(quads[i // 4]) >> U32(6 - 2 * (i % 4))) & U32(3), nib, b)


# BF16 layout 2 is merged in three element-wise passes (symbols, nibbles, quads) over blocks:
# each pass is a plain loop over one input that LLVM vectorizes fully (~0.13 ns per element),
# where one fused loop over groups of four needed lane shuffles (~0.33 ns). The escaped
# exponents of each block follow at once (``_fix_block``). Blocks of 256 Ki elements (512 KiB
# of output, in L2) beat L1-sized ones of 16 Ki: 0.41 vs 0.54 ms per 4 MiB chunk (2026-11-27,
# same process, interleaved): each block's calls and slices cost more than the passes gain
# from L1.
MERGE_BLOCK = 1 << 18  # elements per block of the passes: a multiple of 8 * BLOCK_WORDS


@_jit
def _symbol_pass(symbols: np.ndarray, out: np.ndarray, flags: np.ndarray, b16: np.uint16) -> None:
    """Exponent and top two mantissa bits of each element (sign and lower bits still 0), and
    ``flags[g] = 1`` where the g-th 64 symbols hold an escape (a max per group of 64: one
    vector). ``b16`` is typed uint16 by the caller: converted in here, the loop did not vectorize."""
    span = 8 * BLOCK_WORDS
    groups = symbols.size // span
    for g in range(groups):
        top = U8(0)
        for i in range(g * span, (g + 1) * span):
            s = symbols[i]
            top = max(top, s)
            w = U16(s)
            out[i] = ((((w >> U16(2)) + b16) & U16(255)) << U16(7)) | ((w & U16(3)) << U16(5))
        flags[g] = U8(1) if top >= U8(60) else U8(0)
    for i in range(groups * span, symbols.size):  # no flag: _fix_block scans the tail
        w = U16(symbols[i])
        out[i] = ((((w >> U16(2)) + b16) & U16(255)) << U16(7)) | ((w & U16(3)) << U16(5))


@_jit
def _nibble_pass(nibbles: np.ndarray, out32: np.ndarray) -> None:
    """Sign and low three mantissa bits of two elements (one u32 of output) per nibble byte."""
    for j in range(nibbles.size):
        v = U32(nibbles[j])
        first = ((v >> U32(4)) & U32(7)) | ((v >> U32(7)) << U32(15))
        second = ((v & U32(7)) << U32(16)) | (((v >> U32(3)) & U32(1)) << U32(31))
        out32[j] |= first | second


@_jit
def _quad_pass(quads: np.ndarray, out64: np.ndarray) -> None:
    """Mantissa bits 3-4 of four elements (one u64 of output) per quad byte."""
    for j in range(quads.size):
        v = U64(quads[j])
        two = (((v >> U64(6)) & U64(3)) << U64(3)) | (((v >> U64(4)) & U64(3)) << U64(19))
        out64[j] |= two | (((v >> U64(2)) & U64(3)) << U64(35)) | ((v & U64(3)) << U64(51))


@_jit
def _fix_block(symbols: np.ndarray, flags: np.ndarray, s0: int, s1: int, escapes: np.ndarray, k: int, out) -> int:  # noqa: ANN001
    """Write the escaped exponents of elements [s0, s1) (the 64-symbol groups ``flags`` marks,
    and the tail past the last whole group), from ``escapes[k]`` on; returns the next k, or -1
    where ``escapes`` runs out."""
    span = 8 * BLOCK_WORDS
    groups = (s1 - s0) // span
    for g in range(groups + 1):
        if g < groups and flags[g] == 0:
            continue
        for i in range(s0 + g * span, min(s1, s0 + (g + 1) * span)):
            if symbols[i] >= U8(60):
                if k >= escapes.size:
                    return -1
                out[i] = (out[i] & U16(0x807F)) | (U16(escapes[k]) << U16(7))
                k += 1
    return k


@_jit
def merge6_bf16(
    base: int, symbols: np.ndarray, escapes: np.ndarray, nibbles: np.ndarray, quads: np.ndarray, out8
) -> int:  # noqa: ANN001
    """Layout 2 into ``out8`` (uint8, 2n bytes), escapes included, block by block while the
    block is in cache. Returns the number of escapes the symbols call for, or -1 where that
    exceeds ``escapes``."""
    n, b16 = symbols.size, U16(base)
    out = out8.view(np.uint16)
    out32, out64 = out8[: 4 * (n // 2)].view(np.uint32), out8[: 8 * (n // 4)].view(np.uint64)
    flags = np.empty(MERGE_BLOCK // (8 * BLOCK_WORDS), np.uint8)
    whole, k = n - n % 4, 0
    for s0 in range(0, whole, MERGE_BLOCK):
        s1 = min(whole, s0 + MERGE_BLOCK)
        _symbol_pass(symbols[s0:s1], out[s0:s1], flags, b16)
        _nibble_pass(nibbles[s0 // 2 : s1 // 2], out32[s0 // 2 : s1 // 2])
        _quad_pass(quads[s0 // 4 : s1 // 4], out64[s0 // 4 : s1 // 4])
        k = _fix_block(symbols, flags, s0, s1, escapes, k, out)
        if k < 0:
            return -1
    for i in range(whole, n):
        out[i] = U16(_tail_top(i, symbols, nibbles, quads, U32(base)))
    return _fix_block(symbols, flags, whole, n, escapes, k, out) if k >= 0 else -1


@_jit
def merge6_f32(
    base: int,
    symbols: np.ndarray,
    symbols32: np.ndarray,
    nibbles: np.ndarray,
    nibbles16: np.ndarray,
    quads: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    out: np.ndarray,
) -> None:
    """Layout 2 into u32 words, four per step, the low bytes from the planes."""
    n, b = symbols.size, U32(base)
    for g in range(n // 4):
        t0, t1, t2, t3 = _group_tops(U32(symbols32[g]), U32(nibbles16[g]), U32(quads[g]), b)
        i = 4 * g
        out[i] = (t0 << U32(16)) | (U32(p1[i]) << U32(8)) | U32(p0[i])
        out[i + 1] = (t1 << U32(16)) | (U32(p1[i + 1]) << U32(8)) | U32(p0[i + 1])
        out[i + 2] = (t2 << U32(16)) | (U32(p1[i + 2]) << U32(8)) | U32(p0[i + 2])
        out[i + 3] = (t3 << U32(16)) | (U32(p1[i + 3]) << U32(8)) | U32(p0[i + 3])
    for i in range(n - n % 4, n):
        out[i] = (U32(_tail_top(i, symbols, nibbles, quads, b)) << U32(16)) | (U32(p1[i]) << U32(8)) | U32(p0[i])
