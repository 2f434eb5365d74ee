"""Manifest validation and its JSON form."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cache.errors import CorruptEntryError
from cache.keys import sampling_id
from cache.manifest import Manifest
from tests.cache.factories import manifest_for, video_digest

DIGEST = video_digest("manifest")


def test_json_round_trip() -> None:
    manifest = manifest_for(DIGEST, [0, 30, 60])
    text = manifest.to_json()
    assert json.loads(text)["schema"] == 1
    again = Manifest.from_json(text)
    assert again == manifest
    assert Manifest.from_json(text.encode()) == manifest
    assert manifest.num_frames == 3
    assert manifest.sampling_id == sampling_id(manifest.sampling)


def test_integral_numbers_normalise() -> None:
    manifest = manifest_for(DIGEST, [0, 30])
    raw = json.loads(manifest.to_json())
    raw.update(source_fps=30, duration=2, timestamps=[0, 1])
    again = Manifest.from_json(json.dumps(raw))
    assert again.source_fps == 30.0 and isinstance(again.source_fps, float)
    assert again.timestamps == [0.0, 1.0]


@pytest.mark.parametrize(
    "change",
    [
        {"video_digest": "abc"},
        {"encoder_id": ""},
        {"frame_indices": []},
        {"frame_indices": [0, -1]},
        {"frame_indices": [0, 999]},  # beyond num_source_frames
        {"frame_indices": [0, 1.5]},
        {"frame_indices": [True, 1]},
        {"timestamps": [0.0]},
        {"timestamps": [0.0, float("nan")]},
        {"source_fps": 0.0},
        {"duration": -1.0},
        {"num_source_frames": "61"},
        {"feature_shape": [17, 0]},
        {"feature_shape": []},
        {"dtype": "int4"},
        {"sampling": {"fps": float("inf")}},
        {"sampling": [1, 2]},
    ],
)
def test_invalid_fields_raise(change: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(manifest_for(DIGEST, [0, 30]), **change)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '{"schema": 1}',
        "{broken",
        b"\xff\xfe",
    ],
)
def test_malformed_json_raises_corrupt(text: str | bytes) -> None:
    with pytest.raises(CorruptEntryError):
        Manifest.from_json(text)


def test_schema_and_field_set_are_checked() -> None:
    raw = json.loads(manifest_for(DIGEST, [0]).to_json())
    with pytest.raises(CorruptEntryError, match="schema"):
        Manifest.from_json(json.dumps({**raw, "schema": 0}))
    with pytest.raises(CorruptEntryError, match="unexpected"):
        Manifest.from_json(json.dumps({**raw, "extra": 1}))
    del raw["dtype"]
    with pytest.raises(CorruptEntryError, match="missing"):
        Manifest.from_json(json.dumps(raw))
    bad = json.loads(manifest_for(DIGEST, [0]).to_json())
    bad["frame_indices"] = [-3]
    with pytest.raises(CorruptEntryError):
        Manifest.from_json(json.dumps(bad))
