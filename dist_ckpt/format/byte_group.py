"""Reversible byte-level transforms that make tensor bytes compress better (pure numpy).

zstd sees bytes, but a tensor's bytes are of different kinds: a weight's exponent carries ~2.6
bits of information, its mantissa bits are close to random. The transforms put bytes of one
kind together so zstd's per-block Huffman tables fit each kind (the codec then stores each
resulting stream zstd-compressed, or raw when zstd cannot gain).

``byte_group`` (integers, F64; ``rotate_left1`` first for F16)
    Byte 0 of every element, then byte 1, ... ("byte planes"). For F16 the word is first
    rotated left by one bit (the ZipNN trick: the sign moves to the LSB so the high byte holds
    the 5 exponent bits and the top 3 mantissa bits, with no sign bit mixed in).

``split_float`` (BF16, F32: 8 exponent bits)
    The same sign move makes the exponent one whole byte ``e``; it is then coded jointly with
    the top 4 mantissa bits as one byte per element: ``code << 4 | top4``, where ``code`` is
    ``e - base`` for the 15 consecutive exponents holding most of the chunk (picked from a
    histogram), and 15 means "escaped": that exponent goes verbatim to an escape stream (zeros,
    outliers, ...). Why: an exponent byte has only ~15 live values, which Huffman codes badly
    on its own (whole-bit code lengths for a ~2.6-bit source); joined with 4 near-uniform bits
    the redundancy drops, and the leading mantissa bits of large values (which are skewed) get
    coded in the context of their exponent. The rest (sign + low mantissa bits) is near random:
    whole lower bytes stay byte planes, the last 4 bits (sign + 3) are nibble-packed.

``split_float6`` (BF16, F32: layout 2, an option of chunk format 2)
    ``split_float`` with a 6-bit symbol ``code << 2 | top2`` instead of the joint byte, the
    next two mantissa bits stored raw four to a byte: zstd decodes the smaller symbols faster
    and on weights the chunk is slightly smaller (see the section below).

Stored/raw with zstd-1 on all-MiniLM-L6-v2 (one entry per tensor, 4 MiB chunks), which decided
the table below: BF16 plain 0.780, byte_group 0.692, rotate+group 0.689, split 0.663; F32
plain 0.916, byte_group 0.833, rotate+group 0.833, split 0.818; F16 byte_group 0.8480,
rotate+group 0.8476 (also marginally better on random weights), an F16 split variant 0.849.

Every transform is exact and has its inverse here; empty input round-trips. A trailing partial
element never reaches these functions (the codec stores it verbatim).
"""

from __future__ import annotations

import numpy as np

ESCAPE = 15  # exponent code meaning "exponent stored verbatim in the escape stream"
_WINDOW = 15  # exponents representable by a code
_HIST_SAMPLE = 65536  # elements sampled to pick the exponent window (a histogram, not exact)

_U8 = np.dtype(np.uint8)
_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}  # explicit: the stored byte order


class Workspace:
    """Scratch arrays reused from chunk to chunk (one Workspace per thread).

    A fresh multi-MB numpy temporary is a fresh mmap that page-faults on first touch; with a
    dozen of them alive per chunk that cost 10x the arithmetic itself. Arrays handed out stay
    valid until the same name is asked for again."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: np.dtype | type = _U8) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = n * dt.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[name] = np.empty(max(nbytes, 8), dtype=np.uint8)
        return buf[:nbytes].view(dt)

    @property
    def nbytes(self) -> int:
        """Bytes held by the scratch arrays."""
        return sum(buf.nbytes for buf in self._bufs.values())


def _ws(work: Workspace | None) -> Workspace:
    return work if work is not None else Workspace()


# --- plain byte grouping and rotation --------------------------------------------------------


def byte_group(data: np.ndarray, itemsize: int, work: Workspace | None = None) -> np.ndarray:
    """uint8 array of whole elements -> planes (all byte 0s, then all byte 1s, ...); the
    result lives in ``work`` when given."""
    if itemsize == 1:
        return data
    out = _ws(work).get("planes", data.size)
    np.copyto(out.reshape(itemsize, -1), data.reshape(-1, itemsize).T)
    return out


def byte_ungroup(planes: np.ndarray, itemsize: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`byte_group`; writes into ``out`` (uint8, same length) when given."""
    if out is None:
        out = np.empty_like(planes)
    if itemsize == 1:
        out[...] = planes
    else:
        out.reshape(-1, itemsize).T[...] = planes.reshape(itemsize, -1)
    return out


def rotate_left1(words: np.ndarray, out: np.ndarray | None = None, work: Workspace | None = None) -> np.ndarray:
    """Rotate unsigned words left by one bit: the sign goes to the LSB (the ZipNN trick)."""
    bits = words.dtype.itemsize * 8
    top = np.right_shift(words, bits - 1, out=_ws(work).get("rot", words.size, words.dtype))
    out = np.left_shift(words, 1, out=out)  # safe in place: the top bits were saved first
    return np.bitwise_or(out, top, out=out)


def rotate_right1(words: np.ndarray, out: np.ndarray | None = None, work: Workspace | None = None) -> np.ndarray:
    bits = words.dtype.itemsize * 8
    low = np.left_shift(words, bits - 1, out=_ws(work).get("rot", words.size, words.dtype))
    out = np.right_shift(words, 1, out=out)
    return np.bitwise_or(out, low, out=out)


# --- nibble packing -------------------------------------------------------------------------


def nibble_pack(values: np.ndarray, work: Workspace | None = None) -> np.ndarray:
    """uint8 values < 16 -> half as many bytes (first value in the high nibble); odd n padded with 0."""
    ws = _ws(work)
    n, m = values.size, (values.size + 1) // 2
    if n % 2:
        padded = ws.get("nib_pad", n + 1)
        padded[:n] = values
        padded[n] = 0
        values = padded
    # As little-endian u16 words: low byte is element 2i, high byte 2i+1 (shifts beat strides).
    w = values.view("<u2")
    hi = np.left_shift(w, 4, out=ws.get("nib_a", m, "<u2"))
    hi |= np.right_shift(w, 8, out=ws.get("nib_b", m, "<u2"))
    return _narrow(hi, ws.get("nib_out", m))


def nibble_unpack(packed: np.ndarray, n: int, work: Workspace | None = None) -> np.ndarray:
    """Inverse of :func:`nibble_pack` for ``n`` values."""
    ws = _ws(work)
    m = packed.size
    w = ws.get("unnib_w", m, "<u2")
    low = np.bitwise_and(packed, 15, out=ws.get("unnib_t", m))
    np.copyto(w, low)  # widen to u16
    np.left_shift(w, 8, out=w)
    w |= np.right_shift(packed, 4, out=low)
    return w.view(np.uint8)[:n]


def _narrow(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Keep the low byte of each word (a wrapping cast into a reused buffer)."""
    np.copyto(out, src, casting="unsafe")
    return out


# --- float split (BF16, F32) ------------------------------------------------------------------
#
# Both formats are ``sign | 8 exponent bits | 8m+7 mantissa bits``, so in little-endian words
# the top byte is ``sign e7..e1``, the next one ``e0 m(top 7)``, and any lower bytes are pure
# mantissa. Bytes are pulled out of whole words by shift + narrowing cast (4x faster than
# copying strided byte columns), then handled as uint8 with every result in a reused buffer.
# uint8 ``x << k`` is written ``x * 2**k``: numpy's uint8 left_shift is not vectorised.


def _exponent_window(e: np.ndarray) -> int:
    """Lowest exponent of the 15 consecutive exponents holding most elements (from a sample)."""
    step = max(1, e.size // _HIST_SAMPLE)
    hist = np.bincount(e[::step], minlength=256)
    cum = np.concatenate(([0], np.cumsum(hist)))
    return int(np.argmax(cum[_WINDOW:] - cum[:-_WINDOW]))  # <= 256 - 15


def split_float(data: np.ndarray, itemsize: int, work: Workspace | None = None) -> tuple[int, list[np.ndarray]]:
    """uint8 bytes of whole BF16 (itemsize 2) or F32 (4) elements -> ``base`` and the streams
    ``[joint, escapes, plane 0, ..., plane itemsize-3, packed nibbles]`` (module docstring).
    The streams live in ``work`` when given: use them before the next call with it."""
    ws = _ws(work)
    wt = _WORD[itemsize]
    words = data.view(wt)
    n, bits = words.size, 8 * itemsize
    hi = _narrow(np.right_shift(words, bits - 8, out=ws.get("w", n, wt)), ws.get("hi", n))  # sign e7..e1
    lo = _narrow(np.right_shift(words, bits - 16, out=ws.get("w", n, wt)), ws.get("lo", n))  # e0 m(top 7)
    t = ws.get("t", n)
    e = np.multiply(hi, 2, out=ws.get("e", n))
    e |= np.right_shift(lo, 7, out=t)
    base = _exponent_window(e) if n else 0
    # base <= 241, so an exponent below base wraps to >= 15 and is an escape as well.
    codes = np.subtract(e, np.uint8(base), out=ws.get("codes", n))
    big = np.greater_equal(codes, _WINDOW, out=ws.get("big", n, np.bool_))
    codes |= np.multiply(big.view(np.uint8), ESCAPE, out=t)
    joint = np.multiply(codes, 16, out=ws.get("joint", n))
    np.right_shift(lo, 3, out=t)
    joint |= np.bitwise_and(t, 15, out=t)
    escapes = np.compress(big, e)
    nibbles = np.right_shift(hi, 7, out=codes)  # codes are in joint now: reuse the buffer
    np.multiply(nibbles, 8, out=nibbles)
    nibbles |= np.bitwise_and(lo, 7, out=t)  # sign + the 3 low bits of lo
    planes = [
        _narrow(np.right_shift(words, 8 * j, out=ws.get("w", n, wt)), ws.get(f"p{j}", n)) for j in range(itemsize - 2)
    ]
    return base, [joint, escapes, *planes, nibble_pack(nibbles, ws)]


def split_float_sizes(itemsize: int, n: int, n_escapes: int) -> list[int]:
    """Byte length of each stream :func:`split_float` makes for ``n`` elements."""
    return [n, n_escapes] + [n] * (itemsize - 2) + [(n + 1) // 2]


def count_escapes(joint: np.ndarray) -> int:
    return int(np.count_nonzero(joint >= ESCAPE << 4))


def merge_float(
    base: int, streams: list[np.ndarray], itemsize: int, out: np.ndarray, work: Workspace | None = None
) -> None:
    """Inverse of :func:`split_float`: write the element bytes into ``out`` (uint8, n*itemsize).
    The escape stream must hold exactly :func:`count_escapes` bytes (the codec checks)."""
    ws = _ws(work)
    joint, escapes, *planes, packed = streams
    n, wt, bits = joint.size, _WORD[itemsize], 8 * itemsize
    e = np.right_shift(joint, 4, out=ws.get("e", n))  # the codes, then the exponents
    if escapes.size:
        big = np.equal(e, ESCAPE, out=ws.get("big", n, np.bool_))
        e += np.uint8(base)
        e[big] = escapes  # boolean setitem: ~3x faster than np.place
    else:
        e += np.uint8(base)
    nibbles = nibble_unpack(packed, n, ws)
    t = ws.get("t", n)
    hi = np.right_shift(nibbles, 3, out=ws.get("hi", n))
    np.multiply(hi, 128, out=hi)
    hi |= np.right_shift(e, 1, out=t)
    lo = np.multiply(e, 128, out=ws.get("lo", n))
    np.bitwise_and(joint, 15, out=t)
    lo |= np.multiply(t, 8, out=t)
    lo |= np.bitwise_and(nibbles, 7, out=t)
    # Whole words again: widen each byte plane, shift it into place, OR it in.
    words = out.view(wt)
    tw = ws.get("w", n, wt)
    np.copyto(words, hi, casting="unsafe")
    np.left_shift(words, bits - 8, out=words)
    for j, plane in [(bits // 8 - 2, lo), *enumerate(planes)]:
        np.copyto(tw, plane, casting="unsafe")
        words |= np.left_shift(tw, 8 * j, out=tw) if j else tw


# --- float split, layout 2 (chunk format 2) -------------------------------------------------
#
# The joint byte ``code << 4 | m_top4`` becomes a 6-bit symbol ``code << 2 | m_top2`` and the
# next two mantissa bits go to a raw stream of 2-bit fields (four per byte). Same bits, but the
# Huffman-coded symbol is smaller: on all-MiniLM-L6-v2 BF16 its stream decodes 1.6x faster in
# zstd (4.5 vs 6.6 bits per symbol) and the chunk is slightly smaller (0.6605 vs 0.6627: the two
# bits it gave up were near random). Written here as a re-encoding of layout 1, the reference
# the compiled kernels are tested against.

ESCAPE6 = ESCAPE << 2  # a 6-bit symbol >= this is an escape


def quad_pack(values: np.ndarray, work: Workspace | None = None) -> np.ndarray:
    """uint8 values < 4 -> a quarter as many bytes (the first value in the top two bits)."""
    ws = _ws(work)
    n, m = values.size, (values.size + 3) // 4
    padded = ws.get("quad_pad", 4 * m)
    padded[:n] = values
    padded[n:] = 0
    grid = padded.reshape(m, 4)
    out = np.multiply(grid[:, 0], 64, out=ws.get("quad_out", m))
    out |= np.multiply(grid[:, 1], 16, out=ws.get("quad_t", m))
    out |= np.multiply(grid[:, 2], 4, out=ws.get("quad_t", m))
    out |= grid[:, 3]
    return out


def quad_unpack(packed: np.ndarray, n: int, work: Workspace | None = None) -> np.ndarray:
    """Inverse of :func:`quad_pack` for ``n`` values."""
    grid = _ws(work).get("unquad", 4 * packed.size).reshape(-1, 4)
    for j in range(4):
        np.bitwise_and(np.right_shift(packed, 6 - 2 * j), 3, out=grid[:, j])
    return grid.reshape(-1)[:n]


def split_float6(data: np.ndarray, itemsize: int, work: Workspace | None = None) -> tuple[int, list[np.ndarray]]:
    """Layout 2: ``base`` and ``[symbols, escapes, plane 0, ..., packed nibbles, packed quads]``."""
    ws = _ws(work)
    base, (joint, escapes, *planes, nibbles) = split_float(data, itemsize, ws)
    n = joint.size
    symbols = np.right_shift(joint, 4, out=ws.get("sym", n))
    np.multiply(symbols, 4, out=symbols)
    symbols |= np.bitwise_and(np.right_shift(joint, 2, out=ws.get("sym_t", n)), 3, out=ws.get("sym_t", n))
    quads = quad_pack(np.bitwise_and(joint, 3, out=ws.get("sym_q", n)), ws)
    return base, [symbols, escapes, *planes, nibbles, quads]


def split_float6_sizes(itemsize: int, n: int, n_escapes: int) -> list[int]:
    return [*split_float_sizes(itemsize, n, n_escapes), (n + 3) // 4]


def count_escapes6(symbols: np.ndarray) -> int:
    return int(np.count_nonzero(symbols >= ESCAPE6))


def merge_float6(
    base: int, streams: list[np.ndarray], itemsize: int, out: np.ndarray, work: Workspace | None = None
) -> None:
    """Inverse of :func:`split_float6` (the escape stream must hold :func:`count_escapes6` bytes)."""
    ws = _ws(work)
    symbols, escapes, *rest, quads = streams
    n = symbols.size
    joint = np.right_shift(symbols, 2, out=ws.get("j6", n))
    np.multiply(joint, 16, out=joint)
    joint |= np.multiply(np.bitwise_and(symbols, 3, out=ws.get("j6_t", n)), 4, out=ws.get("j6_t", n))
    joint |= quad_unpack(quads, n, ws)
    merge_float(base, [joint, escapes, *rest], itemsize, out, ws)
