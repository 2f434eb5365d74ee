"""Blob format: exact fp16 round trip, bounded int8 error, and every kind of damage detected."""

from __future__ import annotations

import json
import random

import pytest
import safetensors.torch
import torch

from cache.errors import CorruptEntryError
from cache.serialize import decode, encode, quantize_int8


def vit_like(tokens: int = 17, dim: int = 176, *, seed: int = 0) -> torch.Tensor:
    """Normal features plus a few large-magnitude channels, as ViT activations have."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=generator)
    x[:, :3] *= 20.0
    return x


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def test_float16_round_trip_is_exact() -> None:
    x = vit_like().to(torch.float16)
    y = decode(encode(x))
    assert y.dtype == torch.float16 and y.device.type == "cpu"
    assert torch.equal(y, x)


def test_float32_input_is_stored_as_float16() -> None:
    x = vit_like()
    assert torch.equal(decode(encode(x)), x.to(torch.float16))


def test_int8_error_is_small_and_bytes_halve() -> None:
    x = vit_like().to(torch.float16)
    fp16, int8 = encode(x, "float16"), encode(x, "int8")
    y = decode(int8)
    assert y.dtype == torch.float16 and y.shape == x.shape
    # Per-row absmax: the 20x outlier channels set each row's step, so the other channels lose
    # precision: measured 2.3-2.5% over seeds 0-4 (0.7% on plain Gaussian rows, next test).
    assert relative_error(y, x) < 0.035
    assert len(int8) < 0.6 * len(fp16)


def test_int8_plain_gaussian_error() -> None:
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    assert relative_error(decode(encode(x, "int8")), x) < 0.01


def test_int8_zero_rows_and_extremes() -> None:
    x = torch.zeros(4, 8)
    x[1] = torch.linspace(-3, 3, 8)
    x[2, 0] = 60000.0  # near the fp16 limit
    y = decode(encode(x, "int8"))
    assert torch.equal(y[0], torch.zeros(8, dtype=torch.float16))
    assert torch.isfinite(y).all()
    assert abs(float(y[2, 0]) - 60000.0) / 60000.0 < 1e-3
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert scale.shape == (4, 1) and scale.dtype == torch.float32


def test_blob_is_standard_safetensors() -> None:
    x = vit_like().to(torch.float16)
    loaded = safetensors.torch.load(encode(x))
    assert torch.equal(loaded["features"], x)
    q = safetensors.torch.load(encode(x, "int8"))
    assert q["q"].dtype == torch.int8 and q["scale"].shape == (17, 1)


def test_decode_into_out_slice() -> None:
    x = vit_like().to(torch.float16)
    video = torch.zeros(3, *x.shape, dtype=torch.float16)
    assert decode(encode(x), out=video[1]) is not None
    assert torch.equal(video[1], x) and not video[0].any() and not video[2].any()
    decode(encode(x, "int8"), out=video[2])
    assert torch.equal(video[2], decode(encode(x, "int8")))
    with pytest.raises(ValueError, match="shape"):
        decode(encode(x), out=torch.empty(16, 176, dtype=torch.float16))
    with pytest.raises(ValueError):
        decode(encode(x), out=torch.empty(*x.shape, dtype=torch.float32))


def test_refuses_to_store_non_finite_or_out_of_range() -> None:
    for bad in (float("nan"), float("inf"), 1e6):
        x = torch.zeros(2, 4)
        x[1, 1] = bad
        for fmt in ("float16", "int8"):
            with pytest.raises(ValueError):
                encode(x, fmt)
    with pytest.raises(ValueError):
        encode(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        encode(torch.ones(2, 2), "bf16")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_truncation_is_detected(fmt: str) -> None:
    blob = encode(vit_like(), fmt)  # type: ignore[arg-type]
    for length in (0, 4, 8, 20, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CorruptEntryError):
            decode(blob[:length])
    with pytest.raises(CorruptEntryError):
        decode(blob + b"\x00")


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_every_single_bit_flip_is_detected(fmt: str) -> None:
    blob = encode(vit_like(4, 16), fmt)  # type: ignore[arg-type]
    # Every byte of the blob (header included), one random bit each.
    rng = random.Random(0)
    for position in range(len(blob)):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptEntryError):
            decode(bytes(damaged))


def test_random_garbage_is_detected() -> None:
    rng = random.Random(0)
    for size in (0, 1, 7, 8, 9, 100, 4096):
        with pytest.raises(CorruptEntryError):
            decode(bytes(rng.randrange(256) for _ in range(size)))
    with pytest.raises(CorruptEntryError):
        decode(b"\xff" * 64)


def _rewrite_metadata(blob: bytes, **changes: str) -> bytes:
    tensors = safetensors.torch.load(blob)
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    return safetensors.torch.save(tensors, metadata={**header["__metadata__"], **changes})


def test_wrong_schema_or_format_is_detected() -> None:
    blob = encode(vit_like())
    assert torch.equal(decode(_rewrite_metadata(blob)), decode(blob))  # the rewrite itself is sound
    with pytest.raises(CorruptEntryError, match="schema"):
        decode(_rewrite_metadata(blob, schema="0"))
    with pytest.raises(CorruptEntryError):
        decode(_rewrite_metadata(blob, format="int8"))
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode(_rewrite_metadata(blob, checksum="crc32:00000000"))


def test_foreign_safetensors_blob_is_rejected() -> None:
    x = vit_like().to(torch.float16)
    with pytest.raises(CorruptEntryError):
        decode(safetensors.torch.save({"features": x}))  # no metadata at all
    with pytest.raises(CorruptEntryError):
        decode(safetensors.torch.save({"features": x.float()}, metadata={"schema": "1", "format": "float16"}))


def test_fast_crc32_matches_zlib() -> None:
    """Blobs written with either CRC-32 implementation (ISA-L or zlib) read with the other."""
    import zlib

    from cache import serialize

    data = bytes(range(256)) * 4099
    assert serialize._crc32(data) == zlib.crc32(data)
    assert serialize._crc32(data[1000:], serialize._crc32(data[:1000])) == zlib.crc32(data)
