"""Versioned, content-addressed cache keys.

A frame's features are identified by what produced them, never by file names or request ids:

* ``encoder_id``: an opaque string chosen by the caller that fingerprints the vision weights, the
  input image size and the feature dtype. It is hashed into the key, so it may contain any text.
* ``video_digest``: the sha256 of the video bytes (:func:`digest_bytes`, :func:`digest_file`).
* ``frame_index``: the index in the *source* video, so that two sampling rates of the same video
  share the frames they have in common.

A manifest (which frames a sampling picked, their timestamps, ...) is keyed by the sampling
parameters instead, through :func:`sampling_id`.

Layout (``S`` is :data:`SCHEMA_VERSION`, ``E`` is a 16-hex-digit hash of the encoder id)::

    {namespace}:v{S}:{video_digest}:{E}:f:{frame_index}
    {namespace}:v{S}:{video_digest}:{E}:m:{sampling_id}

The digest comes before the encoder so that one glob (:meth:`FeatureKeys.video_pattern`) finds
every entry of a video, for every encoder and schema version, when a user deletes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

# Bump whenever the key layout, the blob format or the manifest fields change: old entries then
# simply stop being found and age out of Redis instead of being misread.
SCHEMA_VERSION = 1
DEFAULT_NAMESPACE = "llamavid"

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_SAMPLING_ID_RE = re.compile(r"[0-9a-f]{16}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_READ_CHUNK = 1 << 20


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """The sha256 hex digest that names a video held in memory."""
    return hashlib.sha256(data).hexdigest()


def digest_stream(stream: BinaryIO, *, chunk_size: int = _READ_CHUNK) -> str:
    """The sha256 hex digest of everything left in ``stream``, read in chunks.

    Uploads can be gigabytes; hashing them in fixed-size chunks keeps memory flat.
    """
    hasher = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    while True:
        count = stream.readinto(view)  # type: ignore[attr-defined]
        if not count:
            return hasher.hexdigest()
        hasher.update(view[:count])


def digest_file(path: str | os.PathLike[str], *, chunk_size: int = _READ_CHUNK) -> str:
    """The sha256 hex digest of a file on disk; equals ``digest_bytes(open(path).read())``."""
    with open(path, "rb") as stream:
        return digest_stream(stream, chunk_size=chunk_size)


def _canonical(value: object) -> object:
    """Normalise a JSON-like value so that equal parameters always serialise the same way.

    Integral floats become ints (``{"fps": 1}`` and ``{"fps": 1.0}`` mean the same sampling);
    bools stay bools; NaN and infinities are refused because they have no JSON form.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"sampling parameters must be finite, got {value!r}")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"sampling parameter names must be str, got {key!r}")
            out[key] = _canonical(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    raise TypeError(f"unsupported sampling parameter value {value!r} ({type(value).__name__})")


def canonical_json(params: Mapping[str, object]) -> str:
    """Sorted, compact, normalised JSON of the sampling parameters (the input of the hash)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"sampling parameters must be a mapping, got {type(params).__name__}")
    return json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"), allow_nan=False)


def sampling_id(params: Mapping[str, object]) -> str:
    """A short stable id (16 hex digits) of the sampling parameters, e.g. ``{"fps": 1.0, ...}``."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def encoder_tag(encoder_id: str) -> str:
    """The fixed-length, glob-safe form of an encoder id used inside keys."""
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ValueError(f"encoder_id must be a non-empty str, got {encoder_id!r}")
    return hashlib.sha256(encoder_id.encode()).hexdigest()[:16]


def check_digest(video_digest: str) -> str:
    """Return ``video_digest`` if it is a lowercase sha256 hex digest, else raise ``ValueError``.

    Catches swapped arguments (an encoder id passed as a digest) before they become keys.
    """
    if not isinstance(video_digest, str) or not _DIGEST_RE.fullmatch(video_digest):
        raise ValueError(f"video_digest must be 64 lowercase hex digits, got {video_digest!r}")
    return video_digest


def check_frame_index(frame_index: object) -> int:
    """Return ``frame_index`` as an int if it is a non-negative integer (numpy ints included)."""
    if isinstance(frame_index, bool):
        raise TypeError("frame_index must be an integer, not bool")
    index = operator.index(frame_index)  # type: ignore[arg-type]
    if index < 0:
        raise ValueError(f"frame_index must be >= 0, got {index}")
    return index


def check_sampling_id(value: str) -> str:
    """Return ``value`` if it has the form :func:`sampling_id` produces, else raise ``ValueError``."""
    if not isinstance(value, str) or not _SAMPLING_ID_RE.fullmatch(value):
        raise ValueError(f"sampling_id must be 16 lowercase hex digits, got {value!r}")
    return value


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so that ``text`` matches only itself in SCAN MATCH."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


@dataclass(frozen=True)
class FeatureKeys:
    """Builds every key the cache uses, under one namespace (tests use a unique one each)."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        ns = self.namespace
        if not isinstance(ns, str) or not ns or any(c.isspace() for c in ns):
            raise ValueError(f"namespace must be a non-empty str without whitespace, got {self.namespace!r}")

    def _video_prefix(self, encoder_id: str, video_digest: str) -> str:
        digest = check_digest(video_digest)
        return f"{self.namespace}:v{SCHEMA_VERSION}:{digest}:{encoder_tag(encoder_id)}"

    def frame(self, encoder_id: str, video_digest: str, frame_index: int) -> str:
        """Key of one source frame's features."""
        return f"{self._video_prefix(encoder_id, video_digest)}:f:{check_frame_index(frame_index)}"

    def frames(self, encoder_id: str, video_digest: str, indices: Iterable[int]) -> list[str]:
        """Keys of many frames of one video (validates the shared parts once)."""
        prefix = self._video_prefix(encoder_id, video_digest)
        return [f"{prefix}:f:{check_frame_index(i)}" for i in indices]

    def manifest(self, encoder_id: str, video_digest: str, sampling_id: str) -> str:
        """Key of the manifest of one sampling of a video."""
        return f"{self._video_prefix(encoder_id, video_digest)}:m:{check_sampling_id(sampling_id)}"

    def video_pattern(self, video_digest: str) -> str:
        """SCAN MATCH glob for every entry of a video: all encoders, all schema versions."""
        return f"{glob_escape(self.namespace)}:v*:{check_digest(video_digest)}:*"

    def namespace_pattern(self) -> str:
        """SCAN MATCH glob for every key under this namespace (used to clean up after tests)."""
        return f"{glob_escape(self.namespace)}:*"
