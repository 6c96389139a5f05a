"""The zstd codec's scratch buffers (several times a chunk per thread, kept between chunks so
they are not page-faulted in again) are given back when the work ends: at the end of
``dist_ckpt.save`` / ``dist_ckpt.load`` and when a manager closes."""

from __future__ import annotations

import torch

import dist_ckpt
from dist_ckpt import CheckpointManager
from dist_ckpt.format.zstd_chunk import idle_buffer_bytes, release_buffers
from dist_ckpt.format.zstd_codec import ZstdCodec

STATE_BYTES = 4 << 20


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(STATE_BYTES // 4, generator=g), "b": torch.randn(1 << 20, generator=g).bfloat16()}


def _encode_something() -> None:
    raw = _weights()["w"].numpy().tobytes()
    for _ in ZstdCodec(chunk_bytes=1 << 20, threads=2).encode(memoryview(raw), "F32"):
        pass


def test_encoding_keeps_buffers_until_released() -> None:
    release_buffers()
    _encode_something()
    assert idle_buffer_bytes() > 1 << 20  # kept for the next chunk: what the others must free
    release_buffers()
    assert idle_buffer_bytes() == 0


def test_save_and_load_give_the_buffers_back(tmp_path) -> None:
    _encode_something()
    state = _weights()
    uri = str(tmp_path / "run" / "step_000000001")
    dist_ckpt.save(state, uri, compression="zstd")
    assert idle_buffer_bytes() == 0

    _encode_something()
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dist_ckpt.load(out, uri)
    assert idle_buffer_bytes() == 0
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_manager_gives_the_buffers_back_on_close(tmp_path) -> None:
    release_buffers()
    model = torch.nn.Linear(1024, 1024)
    mgr = CheckpointManager(str(tmp_path / "run"), compression="zstd", async_save=False)
    state = mgr.track(model=model)
    assert mgr.save(1, state)
    assert idle_buffer_bytes() > 0  # the manager keeps them between saves...
    mgr.close()
    assert idle_buffer_bytes() == 0  # ...and frees them when it is done
