"""The streaming safetensors writer produces exactly the bytes of safetensors' save_file."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaclone.checkpoint import file_digest, save_weight_shard
from megaclone.convert import StreamingShardWriter, planned_file_bytes

NAMES = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


def write_streaming(path, tensors: dict[str, torch.Tensor], rows_per_chunk: int) -> dict:
    writer = StreamingShardWriter(path, [(k, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"})
    for name, _ in writer.entries:
        writer.begin_tensor(name)
        t = tensors[name]
        if t.dim() == 0:
            writer.write(t)
            continue
        for a in range(0, max(t.shape[0], 1), rows_per_chunk):
            writer.write(t[a:a + rows_per_chunk])
    return writer.finish()


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(NAMES, SHAPES, min_size=1, max_size=6), st.integers(1, 3))
def test_bytes_equal_save_file(tmp_path_factory, shapes: dict[str, tuple[int, ...]], rows: int) -> None:
    d = tmp_path_factory.mktemp("w")
    g = torch.Generator().manual_seed(len(shapes))
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    digest = write_streaming(d / "stream.safetensors", tensors, rows)
    save_weight_shard(d / "ref.safetensors", tensors)
    assert (d / "stream.safetensors").read_bytes() == (d / "ref.safetensors").read_bytes()
    assert digest == file_digest(d / "ref.safetensors")
    assert planned_file_bytes(list(shapes.items()), {"format": "pt"}) == digest["bytes"]
    assert sorted(p.name for p in d.iterdir()) == ["ref.safetensors", "stream.safetensors"]  # no temporary left


def test_order_and_completeness_are_enforced(tmp_path) -> None:
    entries = [("b", (2, 3)), ("a", (4,))]
    writer = StreamingShardWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="got tensor b, the header order expects a"):
        writer.begin_tensor("b")
    writer = StreamingShardWriter(tmp_path / "y.safetensors", entries)
    writer.begin_tensor("a")
    with pytest.raises(ValueError, match="only 16 left"):
        writer.write(torch.zeros(5))
    writer.write(torch.zeros(4))
    with pytest.raises(ValueError, match="finish\\(\\) before every tensor"):
        writer.finish()
    writer.abort()
    assert not any(p.name.startswith(".y") or p.name == "y.safetensors" for p in tmp_path.iterdir())
    assert math.prod((2, 3)) == 6


@pytest.mark.parametrize("mode", ["direct", "cached", "refused"])
def test_direct_file_writes_the_stream_exactly(tmp_path, monkeypatch, mode: str) -> None:
    """O_DIRECT through a small staging buffer (writes of whole buffers, a padded tail truncated back), the page
    cache when asked, and the page cache after a filesystem refuses the first O_DIRECT write: the same bytes as
    a plain write, at lengths that are no multiple of the block or the buffer size."""
    import errno
    import os

    from megaclone.convert import writer as writer_module

    monkeypatch.setattr(writer_module, "STAGE_BYTES", 3 * writer_module.DIRECT_ALIGN)
    if mode == "refused":
        real_write, refused = os.write, []

        def write(fd: int, data) -> int:
            if not refused:
                refused.append(fd)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)

        monkeypatch.setattr(writer_module.os, "write", write)
    g = torch.Generator().manual_seed(0)
    pieces = [bytes(range(256))[:13]] + [torch.randn(n, generator=g) for n in (1, 5000, 2048, 3071, 7)]
    want = b"".join(p if isinstance(p, bytes) else p.numpy().tobytes() for p in pieces)
    f = writer_module.DirectFile(tmp_path / "f.bin", direct=mode != "cached")
    for piece in pieces:
        f.write(piece if isinstance(piece, bytes) else memoryview(piece.numpy()))
    assert f.direct == (mode == "direct")
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == want and f.size == len(want)
