"""Key building: identity, versioning, namespacing, digests and sampling ids."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pytest

from cache.keys import (
    SCHEMA_VERSION,
    FeatureKeys,
    canonical_json,
    digest_bytes,
    digest_file,
    digest_stream,
    glob_escape,
    sampling_id,
)
from tests.cache.factories import ENCODER, video_digest

DIGEST = video_digest("a")


def test_digest_bytes_is_sha256_hex() -> None:
    assert digest_bytes(b"video") == hashlib.sha256(b"video").hexdigest()


def test_streaming_digest_matches_in_memory(tmp_path) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks, last one partial
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    assert digest_file(path, chunk_size=4096) == digest_bytes(data)
    assert digest_stream(io.BytesIO(data), chunk_size=1000) == digest_bytes(data)
    assert digest_stream(io.BytesIO(b"")) == digest_bytes(b"")


def test_sampling_id_is_stable_and_order_insensitive() -> None:
    a = sampling_id({"fps": 1.0, "max_frames": 256, "start": 0, "end": None})
    b = sampling_id({"end": None, "start": 0.0, "max_frames": 256, "fps": 1})
    assert a == b
    assert re.fullmatch(r"[0-9a-f]{16}", a)
    # A fixed value: changing the canonical form silently would orphan every stored manifest.
    assert canonical_json({"fps": 1.0, "end": None}) == '{"end":null,"fps":1}'


def test_sampling_id_distinguishes_parameters() -> None:
    base = {"fps": 1.0, "max_frames": 256, "start": 0, "end": None}
    ids = {sampling_id(base)}
    for change in ({"fps": 2.0}, {"max_frames": 128}, {"end": 10.5}, {"fps": 0.5}):
        ids.add(sampling_id({**base, **change}))
    assert len(ids) == 5
    assert sampling_id({"flag": True}) != sampling_id({"flag": 1})


@pytest.mark.parametrize("bad", [{"fps": float("nan")}, {"fps": float("inf")}, {1: 2}, {"x": object()}])
def test_sampling_id_rejects_values_without_a_stable_form(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        sampling_id(bad)


def test_frame_key_identity() -> None:
    keys = FeatureKeys()
    key = keys.frame(ENCODER, DIGEST, 12)
    assert key.startswith(f"llamavid:v{SCHEMA_VERSION}:{DIGEST}:")
    assert key.endswith(":f:12")
    assert keys.frame(ENCODER, DIGEST, np.int64(12)) == key
    assert keys.frame(ENCODER, DIGEST, 13) != key
    assert keys.frame(ENCODER + "-bf16", DIGEST, 12) != key
    assert keys.frame(ENCODER, video_digest("b"), 12) != key
    assert FeatureKeys("other").frame(ENCODER, DIGEST, 12) != key
    assert keys.frames(ENCODER, DIGEST, [12, 13]) == [key, keys.frame(ENCODER, DIGEST, 13)]


def test_encoder_id_may_hold_any_text() -> None:
    key = FeatureKeys().frame("weird id: * ? [x] \\ 日本", DIGEST, 0)
    assert "*" not in key and " " not in key


def test_manifest_key_differs_from_frame_keys() -> None:
    keys = FeatureKeys("ns")
    sid = sampling_id({"fps": 1})
    key = keys.manifest(ENCODER, DIGEST, sid)
    assert key.endswith(f":m:{sid}")
    assert key not in keys.frames(ENCODER, DIGEST, range(10))


@pytest.mark.parametrize(
    "call",
    [
        lambda k: k.frame(ENCODER, "not-a-digest", 0),
        lambda k: k.frame(ENCODER, DIGEST.upper(), 0),
        lambda k: k.frame(ENCODER, DIGEST, -1),
        lambda k: k.frame("", DIGEST, 0),
        lambda k: k.manifest(ENCODER, DIGEST, "nothex"),
    ],
)
def test_bad_arguments_are_rejected(call) -> None:
    with pytest.raises(ValueError):
        call(FeatureKeys())


def test_bool_and_float_indices_are_rejected() -> None:
    with pytest.raises(TypeError):
        FeatureKeys().frame(ENCODER, DIGEST, True)
    with pytest.raises(TypeError):
        FeatureKeys().frame(ENCODER, DIGEST, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("namespace", ["", "has space"])
def test_bad_namespace(namespace: str) -> None:
    with pytest.raises(ValueError):
        FeatureKeys(namespace)


def test_video_pattern_covers_frames_and_manifests_of_every_encoder() -> None:
    keys = FeatureKeys("test:[ns]*")
    pattern = keys.video_pattern(DIGEST)
    assert pattern == f"test:\\[ns\\]\\*:v*:{DIGEST}:*"
    regex = _glob_to_regex(pattern)
    assert regex.fullmatch(keys.frame(ENCODER, DIGEST, 3))
    assert regex.fullmatch(keys.frame("other", DIGEST, 3))
    assert regex.fullmatch(keys.manifest(ENCODER, DIGEST, sampling_id({"fps": 1})))
    assert not regex.fullmatch(keys.frame(ENCODER, video_digest("b"), 3))
    assert not regex.fullmatch(FeatureKeys("test:xns]").frame(ENCODER, DIGEST, 3))


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Redis-style glob (``*``, ``?``, backslash escapes) as a regex, for offline checks."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
            out.append(re.escape(pattern[i]))
        elif char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))
