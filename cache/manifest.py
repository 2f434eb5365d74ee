"""The manifest: what one sampling of one video produced, stored next to the frames.

The frames themselves are keyed by source frame index; the manifest is what turns "this video at
1 fps, at most 256 frames" into the list of indices to fetch, plus the timestamps the prompt needs,
without decoding the video again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cache.errors import CorruptEntryError
from cache.keys import SCHEMA_VERSION, canonical_json, check_digest, check_frame_index, sampling_id

FEATURE_DTYPES = frozenset({"float16", "bfloat16", "float32"})


def _int(name: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number")
    return number


@dataclass(frozen=True)
class Manifest:
    """One sampling of one video, as cached.

    ``frame_indices`` index the source video (``0 <= i < num_source_frames``); ``timestamps`` are
    their times in seconds, one per index. ``feature_shape`` is the shape of one frame's features
    (``[1 + P, C]``) and ``dtype`` the dtype the features were computed in.
    """

    video_digest: str
    encoder_id: str
    sampling: dict[str, Any]
    frame_indices: list[int]
    timestamps: list[float]
    source_fps: float
    num_source_frames: int
    duration: float
    feature_shape: list[int]
    dtype: str
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        # Normalise in place (frozen, hence object.__setattr__) so equal manifests compare equal
        # whether they were built by the worker or parsed back from JSON.
        check_digest(self.video_digest)
        if not isinstance(self.encoder_id, str) or not self.encoder_id:
            raise ValueError("encoder_id must be a non-empty str")
        if not isinstance(self.sampling, Mapping):
            raise TypeError("sampling must be a mapping")
        canonical_json(self.sampling)  # raises on values that have no stable id
        set_ = object.__setattr__
        set_(self, "sampling", dict(self.sampling))
        num_source = _int("num_source_frames", self.num_source_frames)
        indices = [check_frame_index(i) for i in self.frame_indices]
        if not indices:
            raise ValueError("a manifest needs at least one frame")
        if any(i >= num_source for i in indices):
            raise ValueError(f"frame index out of range for a {num_source}-frame video")
        set_(self, "frame_indices", indices)
        stamps = [_float("timestamp", t) for t in self.timestamps]
        if len(stamps) != len(indices):
            raise ValueError(f"{len(stamps)} timestamps for {len(indices)} frames")
        set_(self, "timestamps", stamps)
        set_(self, "source_fps", _float("source_fps", self.source_fps, positive=True))
        set_(self, "duration", _float("duration", self.duration))
        shape = [_int("feature_shape entry", n, minimum=1) for n in self.feature_shape]
        if not shape:
            raise ValueError("feature_shape must have at least one dimension")
        set_(self, "feature_shape", shape)
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {self.dtype!r}")
        set_(self, "created_at", _float("created_at", self.created_at))

    @property
    def num_frames(self) -> int:
        """How many frames this sampling selected (the T of the [T, N, C] video tensor)."""
        return len(self.frame_indices)

    @property
    def sampling_id(self) -> str:
        """The id of :attr:`sampling`, as used in the manifest key."""
        return sampling_id(self.sampling)

    def to_json(self) -> str:
        """Compact JSON, tagged with the schema version."""
        return json.dumps(
            {"schema": SCHEMA_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"), allow_nan=False
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> Manifest:
        """Parse and validate; anything malformed raises :class:`CorruptEntryError`."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise CorruptEntryError(f"manifest is not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise CorruptEntryError("manifest JSON must be an object")
        schema = raw.pop("schema", None)
        if schema != SCHEMA_VERSION:
            raise CorruptEntryError(f"manifest schema {schema!r}, expected {SCHEMA_VERSION}")
        names = {f for f in cls.__dataclass_fields__}
        if set(raw) != names:
            missing, extra = sorted(names - set(raw)), sorted(set(raw) - names)
            raise CorruptEntryError(f"manifest fields differ: missing {missing}, unexpected {extra}")
        for name in ("frame_indices", "timestamps", "feature_shape"):
            if not isinstance(raw[name], list):
                raise CorruptEntryError(f"manifest {name} must be a list")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as error:
            raise CorruptEntryError(f"invalid manifest: {error}") from error
