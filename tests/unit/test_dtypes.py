"""The one dtype table (dist_ckpt.format.dtypes): every dtype it lists round-trips through a
shard's safetensors header and metadata.json under the names the table gives, and its other
views (element sizes, torch.dtype <-> safetensors name, the codec's transform) agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_save_load import same_bits, sample

import dist_ckpt
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format import dtypes
from dist_ckpt.format.safetensors_header import parse_header
from dist_ckpt.format.zstd_chunk import transform_of

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

STORABLE = [d for d in dtypes.DTYPES if d.safetensors is not None]
METADATA_ONLY = [d for d in dtypes.DTYPES if d.safetensors is None]


def test_the_table_and_its_views_agree() -> None:
    assert len({d.torch_name for d in dtypes.DTYPES}) == len(dtypes.DTYPES)
    assert len({d.safetensors for d in STORABLE}) == len(STORABLE)
    for d in dtypes.DTYPES:
        torch_dtype = getattr(torch, d.torch_name)
        assert torch.empty((), dtype=torch_dtype).element_size() == d.itemsize, d
        assert dtypes.dtype_name(torch_dtype) == d.torch_name
        assert dtypes.dtype_from_name(d.torch_name, "test") is torch_dtype
        assert dtypes.check_dtype_name(d.torch_name, "test") == d.torch_name
    for d in STORABLE:
        torch_dtype = getattr(torch, d.torch_name)
        assert dtypes.torch_to_safetensors()[torch_dtype] == d.safetensors
        assert dtypes.safetensors_to_torch()[d.safetensors] is torch_dtype
        assert dtypes.safetensors_itemsize(d.safetensors) == d.itemsize
        for version in (1, 2):  # the codec has a transform for every storable dtype
            assert transform_of(d.safetensors, version)[1] == d.itemsize
    assert set(dtypes.torch_to_safetensors().values()) == set(dtypes.BY_SAFETENSORS)


def test_names_outside_the_table_are_refused() -> None:
    with pytest.raises(CorruptCheckpoint, match="metadata.json: unknown dtype 'float128'"):
        dtypes.check_dtype_name("float128", "metadata.json")
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F128'"):
        dtypes.safetensors_itemsize("F128")


def _stored_entry(uri: str) -> tuple[Path, str]:
    view = CheckpointView.open(uri)
    (ref,) = view.refs("t")
    return Path(uri) / ref.file, ref.entry


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("d", STORABLE, ids=lambda d: d.torch_name)
def test_every_dtype_roundtrips_through_header_and_metadata(tmp_path, d, compression) -> None:
    torch_dtype = getattr(torch, d.torch_name)
    t = sample(torch_dtype, (64, 33), seed=3)
    uri = str(tmp_path / "run" / "step_000000001")
    dist_ckpt.save({"t": t}, uri, compression=compression)

    assert CheckpointView.open(uri).tensors["t"].dtype == d.torch_name  # metadata.json
    path, entry = _stored_entry(uri)
    raw = path.read_bytes()
    header = parse_header(raw, path.name, len(raw))
    assert header.entries[entry].dtype == d.safetensors  # the shard's header (real dtype)
    if compression == "none":  # the safetensors library itself reads it as this torch dtype
        with safe_open(str(path), framework="pt") as f:
            assert same_bits(f.get_tensor(entry), t)

    out = {"t": torch.zeros_like(t)}
    dist_ckpt.load(out, uri)
    assert same_bits(out["t"], t)


@pytest.mark.parametrize("d", METADATA_ONLY, ids=lambda d: d.torch_name)
def test_a_dtype_safetensors_cannot_hold_is_refused_naming_the_key(tmp_path, d) -> None:
    t = torch.zeros(3, dtype=getattr(torch, d.torch_name))
    uri = tmp_path / "run" / "step_000000001"
    with pytest.raises(CorruptCheckpoint, match=f"w: dtype torch.{d.torch_name} cannot be stored in safetensors"):
        dist_ckpt.save({"w": t}, str(uri))
    assert not (uri / "COMMITTED").exists()
    assert not (uri / "metadata.json").exists()
