"""The numba kernels of split_float (layouts 1 and 2): the same streams as the numpy reference,
the same chunks on disk, chunks of format 1 written before format 2 still read, corruption
still caught."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zstd_codec import TORCH_DTYPES, make_tensor, tensor_bytes
from zstd_common import as_format_3

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format import byte_group as bg
from dist_ckpt.format import float_jit
from dist_ckpt.format import zstd_chunk as zch
from dist_ckpt.format.dtypes import safetensors_itemsize
from dist_ckpt.format.zstd_codec import ZstdCodec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "zstd_chunks_v1"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_numba_is_installed() -> None:
    # The speed figures in the README depend on it; a missing numba must fail here, not go unseen.
    assert float_jit.AVAILABLE, "numba is not importable: pip install -e '.[test]' (numba is a dependency)"


@FAST
@given(
    itemsize=st.sampled_from([2, 4]),
    n=st.integers(0, 700),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["normal", "bits"]),
)
def test_kernels_write_the_reference_streams_and_invert(itemsize: int, n: int, seed: int, kind: str) -> None:
    dtype = "BF16" if itemsize == 2 else "F32"
    data = np.frombuffer(tensor_bytes(make_tensor(dtype, n, seed, kind)), dtype=np.uint8)
    _check_both_layouts(data, itemsize)


def _check_both_layouts(data: np.ndarray, itemsize: int) -> None:
    ref_base, ref_streams = bg.split_float6(data, itemsize)
    ref = [s.tobytes() for s in ref_streams]
    assert [s.size for s in ref_streams] == bg.split_float6_sizes(itemsize, data.size // itemsize, ref_streams[1].size)
    base, streams = float_jit.split_float6(data, itemsize, bg.Workspace())
    assert base == ref_base
    assert [s.tobytes() for s in streams] == ref
    out = np.full_like(data, 0xA5)  # garbage first: every byte must be written
    assert float_jit.merge_float6(base, streams, itemsize, out) == streams[1].size
    assert out.tobytes() == data.tobytes()
    out = np.full_like(data, 0xA5)
    bg.merge_float6(base, [np.frombuffer(r, np.uint8) for r in ref], itemsize, out)
    assert out.tobytes() == data.tobytes()
    base1, streams1 = bg.split_float(data, itemsize)  # layout 1 (format 1): decoded by its own kernel
    out = np.full_like(data, 0xA5)
    assert float_jit.merge_float(base1, streams1, itemsize, out) == streams1[1].size
    assert out.tobytes() == data.tobytes()


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 4097])
def test_every_exponent_escaped(dtype: str, n: int) -> None:
    """Exponents spread over the whole range: most elements escape; odd sizes hit the tails."""
    itemsize = safetensors_itemsize(dtype)
    gen = torch.Generator().manual_seed(n)
    t = torch.ldexp(torch.ones(n, dtype=torch.float64), torch.randint(-120, 120, (n,), generator=gen))
    data = np.frombuffer(tensor_bytes(t.to(TORCH_DTYPES[dtype])), dtype=np.uint8)
    _check_both_layouts(data, itemsize)


@pytest.mark.parametrize("n", [2 * 2**18, 3 * 2**18 + 5 * 64 + 3, 2**18 + 64 + 61])
def test_bf16_merge_over_several_blocks_with_escapes_at_every_edge(n: int) -> None:
    """The BF16 layout-2 merge runs in blocks of MERGE_BLOCK elements and flags the 64-symbol
    groups that hold an escape: escapes (zeros, infinities, NaN, denormals, huge values) at
    the first and last element of groups and blocks, in the unflagged tail, and nowhere else
    in some groups, all come back bit for bit."""
    from dist_ckpt.format import float_kernels

    block = float_kernels.MERGE_BLOCK
    assert n > block, "the test must span more than one merge block"
    gen = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-41, 3e38, -1e-30]
    edges = [0, 1, 63, 64, 127, 128, block - 1, block, block + 1, block + 63, n - 64, n - 4, n - 3, n - 1]
    for k, at in enumerate(edges):
        t[at] = specials[k % len(specials)]
    data = np.frombuffer(tensor_bytes(t.to(torch.bfloat16)), dtype=np.uint8)
    _check_both_layouts(data, 2)
    raw = data.tobytes()
    codec = ZstdCodec(chunk_bytes=1 << 22, threads=1)
    chunks = list(codec.encode(memoryview(raw), "BF16"))
    assert [c[0][1] for c in chunks] == [zch.T_SPLIT6], "the chunk should take layout 2 (weights-like values)"
    out = bytearray(len(raw))
    codec.decode_into([c for c, _ in chunks], [r for _, r in chunks], "BF16", memoryview(out))
    assert bytes(out) == raw


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("n", [0, 1, 3, 1001])
def test_chunks_are_the_same_with_and_without_numba(dtype: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths write byte-identical chunks and read each other's: the format did not change."""
    raw = tensor_bytes(make_tensor(dtype, n, 3, "normal"))
    codec = ZstdCodec(chunk_bytes=1000, threads=1)
    fast = list(codec.encode(memoryview(raw), dtype))
    monkeypatch.setattr(float_jit, "AVAILABLE", False)
    slow = list(codec.encode(memoryview(raw), dtype))
    assert fast == slow
    out = bytearray(len(raw))
    codec.decode_into([c for c, _ in fast], [r for _, r in fast], dtype, memoryview(out))
    assert bytes(out) == raw
    monkeypatch.setattr(float_jit, "AVAILABLE", True)
    out = bytearray(len(raw))
    codec.decode_into([c for c, _ in slow], [r for _, r in slow], dtype, memoryview(out))
    assert bytes(out) == raw


def _fixture_raw(dtype: str) -> bytes:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_fixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.raw_values(dtype)


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "I64", "U8"])
def test_format_1_fixtures_still_decode(dtype: str, use_numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks committed by the codec of format 1 decode to the values they were made from.
    Today's encoder writes format 3: for dtypes whose transform did not change, the same streams
    with format 3's checks (``as_format_3``); BF16/F32 chunks use layout 2 and are smaller."""
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    raw_lens = json.loads((FIXTURES / "index.json").read_text())[dtype]
    stored = [(FIXTURES / f"{dtype}.{i}.chunk").read_bytes() for i in range(len(raw_lens))]
    assert all(s[0] == 1 for s in stored)  # format version byte
    raw = _fixture_raw(dtype)
    codec = ZstdCodec(level=1, chunk_bytes=4000, threads=2)
    out = bytearray(sum(raw_lens))
    codec.decode_into(stored, raw_lens, dtype, memoryview(out))
    assert bytes(out) == raw
    new = [c for c, _ in codec.encode(memoryview(raw), dtype)]
    assert all(c[0] == zch.FORMAT_VERSION == 3 for c in new)
    if dtype in ("F32", "BF16"):
        assert all(c[1] in (zch.T_SPLIT, zch.T_SPLIT6) for c in new) and all(c[1] == zch.T_SPLIT for c in stored)
        assert sum(map(len, new)) <= sum(map(len, stored))
    else:
        assert new == [as_format_3(c) for c in stored]


def _with_header(stored: bytes, version: int, transform: int) -> bytes:
    body = bytes([version, transform]) + stored[2:-8]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@pytest.mark.parametrize(
    ("version", "transform"), [(0, zch.T_SPLIT6), (1, zch.T_SPLIT6), (3, zch.T_ROT_GROUP)]
)  # a version newer than this build's: test_zstd_format3 (IncompatibleCheckpoint, not damage)
def test_unknown_version_or_a_transform_of_the_other_version_is_refused(version: int, transform: int) -> None:
    raw = tensor_bytes(make_tensor("BF16", 300, 5, "normal"))
    codec = ZstdCodec(threads=1)
    ((stored, raw_len),) = list(codec.encode(memoryview(raw), "BF16"))
    with pytest.raises(CorruptCheckpoint, match=r"chunk 2: .*(format version|transform)"):
        codec.decode_chunk(_with_header(stored, version, transform), raw_len, "BF16", index=2)


def _rewrite_escapes(stored: bytes, change: int) -> bytes:
    """The chunk with its (raw) escape stream one byte shorter or longer, table and checksum
    updated: only the escape count check can catch it."""
    head = zch.HEAD.unpack_from(stored)
    table_at = zch.HEAD.size
    table = [zch.STREAM.unpack_from(stored, table_at + i * zch.STREAM.size) for i in range(head[3])]
    assert table[1][0] == zch.MODE_RAW and table[1][1] > 0
    pos = table_at + len(table) * zch.STREAM.size
    payloads = []
    for _, length in table:
        payloads.append(stored[pos : pos + length])
        pos += length
    payloads[1] = payloads[1][:-1] if change < 0 else payloads[1] + payloads[1][:1]
    table[1] = (zch.MODE_RAW, len(payloads[1]))
    body = stored[:table_at] + b"".join(zch.STREAM.pack(*t) for t in table) + b"".join(payloads)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("change", [-1, 1])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_escape_count_mismatch_is_corruption(
    dtype: str, change: int, use_numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_tensor(dtype, 501, 11, "normal")
    t[::50] = 0  # 11 zeros: escaped exponents, a raw escape stream (< 64 bytes)
    raw = tensor_bytes(t)
    codec = ZstdCodec(chunk_bytes=1 << 20, threads=1)
    ((stored, raw_len),) = list(codec.encode(memoryview(raw), dtype))
    bad = _rewrite_escapes(stored, change)
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    with pytest.raises(CorruptCheckpoint, match="chunk 4"):
        codec.decode_chunk(bad, raw_len, dtype, index=4)


def test_importing_the_codec_does_not_import_numba() -> None:
    """numba costs ~0.8 s to import: only a process that encodes or decodes a float chunk pays it
    (the CLI reads manifests and headers through the same modules)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; import dist_ckpt.format.zstd_codec, dist_ckpt.format.shard; "
        "assert 'numba' not in sys.modules, 'numba imported'; "
        "from dist_ckpt.format.zstd_codec import ZstdCodec; import torch; "
        "raw = torch.ones(100, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(); "
        "list(ZstdCodec(threads=1).encode(memoryview(raw), 'BF16')); "
        "assert 'numba' in sys.modules, 'kernels not used'"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _adamw_state(dtype: str) -> torch.Tensor:
    """exp_avg_sq of a few real AdamW steps: structured mantissas, where layout 1 tends to win."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        opt.step()
    return opt.state[model[0].weight]["exp_avg_sq"].reshape(-1).to(TORCH_DTYPES[dtype])


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("kind", ["normal", "bits", "adamw"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_each_chunk_takes_the_smaller_float_layout(
    dtype: str, kind: str, use_numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 4096 elements a chunk takes the layout that compresses a sample smaller: within a
    hair of the smaller chunk; below, layout 1 (format 1's streams). Either decodes."""
    monkeypatch.setattr(float_jit, "AVAILABLE", use_numba)
    t = _adamw_state(dtype) if kind == "adamw" else make_tensor(dtype, 20000, 2, kind)
    codec = ZstdCodec(chunk_bytes=1 << 20, threads=1)
    for part in (t[:4095], t):
        raw = tensor_bytes(part)
        ((chosen, raw_len),) = list(codec.encode(memoryview(raw), dtype))
        forced = {}
        with monkeypatch.context() as patch:
            for layout in (zch.T_SPLIT, zch.T_SPLIT6):
                patch.setattr(zch, "_choose_split", lambda *args, layout=layout: layout)
                ((forced[layout], _),) = list(codec.encode(memoryview(raw), dtype))
                assert forced[layout][:2] == bytes([zch.FORMAT_VERSION, layout])
                assert codec.decode_chunk(forced[layout], raw_len, dtype) == raw
        if part.numel() < 4096:
            assert chosen == forced[zch.T_SPLIT]
        else:
            assert chosen in forced.values()
            assert len(chosen) <= 1.005 * min(len(c) for c in forced.values())


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("offset", [1, 2, 3, 6])
def test_decode_into_a_misaligned_buffer(dtype: str, offset: int) -> None:
    """A reader may decode into any byte offset of a larger buffer: the kernels view the output
    as u16/u32/u64 words, which must not assume it is aligned."""
    raw = tensor_bytes(make_tensor(dtype, 3 * 16384 + 7, 5, "normal"))
    codec = ZstdCodec(chunk_bytes=1 << 16, threads=1)
    chunks = list(codec.encode(memoryview(raw), dtype))
    assert any(c[1] == zch.T_SPLIT6 for c, _ in chunks)
    backing = bytearray(len(raw) + offset)
    out = memoryview(backing)[offset:]
    codec.decode_into([c for c, _ in chunks], [r for _, r in chunks], dtype, out)
    assert bytes(out) == raw
