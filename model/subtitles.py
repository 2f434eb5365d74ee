"""Subtitles as an input: SRT / WebVTT text, a container's text track, and per-frame assignment.

LLaMA-VID's long-video model was trained on movies whose subtitles were interleaved with the
frames (spec §6.3): each sampled frame's ``<image>`` tokens are followed by the text of the cues
that end just after it. The official code only did this offline (Whisper, then a pickle); this
module turns what users actually have -- a subtitle file, or a video with a subtitle track --
into the per-frame texts ``LlamaVid.prepare(subtitles=...)`` takes.

Torch-free (the HTTP process imports it to validate uploads); PyAV is imported only to read
containers.
"""

from __future__ import annotations

import codecs
import html
import io
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path


class SubtitleError(ValueError):
    """The text is not SRT or WebVTT, or a container's subtitle track cannot be read."""


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float  # seconds
    text: str  # markup stripped, the cue's lines joined by a space


# -- SRT / WebVTT ----------------------------------------------------------------------------------
# Hours are optional (WebVTT's mm:ss.ttt) and may have any number of digits (movies past 99 h are
# rare, concatenated streams are not); the fraction may be "," (SRT) or "." (WebVTT) and any length.
_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d+))?"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s.*)?$")  # WebVTT cue settings may follow
# What a timing line was meant to be, valid or not ("00:01,000 -> 00:02,000"): it is read as one,
# so a typo is reported on its line instead of turning into cue text.
_TIMING_ATTEMPT = re.compile(r"^\s*\d[\d:.,]*\s*-+>|.*-->")
_VTT_SIGNATURE = re.compile(r"^WEBVTT(?:[ \t].*)?$")
_VTT_SKIPPED_BLOCK = re.compile(r"^(?:NOTE|STYLE|REGION)(?:[ \t].*)?$")
# HTML-ish tags (<i>, </b>, <font color=..>, WebVTT <v Name>, <c.class>, <lang en>, <00:01.000>),
# but not a lone "<" in text such as "I <3 you".
_TAG = re.compile(r"</?(?:[A-Za-z][^<>]*|\d[\d:.]*)>")
# ASS override blocks that SRT files converted from ASS carry: {\an8}, {\i1}, {\pos(10,20)}.
_SRT_ASS_OVERRIDE = re.compile(r"\{\\[^{}]*\}")


def load_subtitles(source: str | os.PathLike | bytes) -> list[Cue]:
    """A subtitle file (path or its bytes) -> cues: ``parse_subtitles`` after decoding the bytes.

    Subtitle files come in UTF-8 (with or without BOM), UTF-16 with a BOM, or, for older ones, a
    Windows code page; the last is read as cp1252, so accented Latin text survives.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    return parse_subtitles(text)


def parse_subtitles(text: str) -> list[Cue]:
    """SRT or WebVTT text -> cues in file order (the official assignment walks them in order).

    WebVTT is recognised by its ``WEBVTT`` signature, anything else is read as SRT. Tolerated:
    a BOM, CRLF or CR line ends, no trailing blank line, missing cue numbers, missing blank lines
    between SRT cues, blank lines inside an SRT cue's text. Cues left without text once markup
    is stripped are dropped. A text that is neither format raises ``SubtitleError`` naming the line.
    """
    lines = text.lstrip("\ufeff").splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise SubtitleError("line 1: the subtitle text is empty")
    vtt = bool(_VTT_SIGNATURE.match(lines[first].strip()))
    i = first + 1 if vtt else first
    if vtt:  # header lines (X-TIMESTAMP-MAP=...) run to the first blank line
        while i < len(lines) and lines[i].strip() and "-->" not in lines[i]:
            i += 1
    blocks: list[tuple[float, float, list[str]]] = []
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
            continue
        if vtt and _VTT_SKIPPED_BLOCK.match(line):
            i = _block_end(lines, i)
            continue
        if not _is_timing(lines, i) and _is_timing(lines, i + 1):
            i += 1  # a cue identifier: the SRT number or a WebVTT cue id
        elif not _is_timing(lines, i):
            if not blocks:
                raise SubtitleError(f"line {i + 1}: expected a cue number or a 'start --> end' timing line, "
                                    f"found {line[:60]!r}: not SRT or WebVTT")
            end = _block_end(lines, i)
            if not vtt:  # an SRT cue whose text had a blank line in it; WebVTT ignores such blocks
                blocks[-1][2].extend(lines[i:end])
            i = end
            continue
        start, stop = _timing(lines[i], i + 1)
        i += 1
        body: list[str] = []
        # Without a blank line, the next cue starts at a timing line or at the SRT number before one
        # (a WebVTT cue id needs the blank line, as any text line could be one).
        while i < len(lines) and lines[i].strip() and not _is_timing(lines, i) \
                and not (lines[i].strip().isdigit() and _is_timing(lines, i + 1)):
            body.append(lines[i])
            i += 1
        blocks.append((start, stop, body))
    cues = [Cue(start, end, _join(_markup_free(line) for line in body)) for start, end, body in blocks]
    return [cue for cue in cues if cue.text]


def _is_timing(lines: list[str], i: int) -> bool:
    """Whether line ``i`` is meant as a timing line; ``_timing`` says whether it is a valid one."""
    return i < len(lines) and _TIMING_ATTEMPT.match(lines[i]) is not None


def _block_end(lines: list[str], i: int) -> int:
    while i < len(lines) and lines[i].strip():
        i += 1
    return i


def _timing(line: str, number: int) -> tuple[float, float]:
    match = _TIMING.match(line)
    if match is None:
        raise SubtitleError(f"line {number}: malformed timing {line.strip()[:60]!r} "
                            "(expected 'HH:MM:SS,mmm --> HH:MM:SS,mmm')")
    groups = match.groups()
    start, end = _seconds(*groups[:4]), _seconds(*groups[4:])
    if end < start:
        raise SubtitleError(f"line {number}: the cue ends ({end:.3f}s) before it starts ({start:.3f}s)")
    return start, end


def _seconds(hours: str | None, minutes: str, seconds: str, fraction: str | None) -> float:
    value = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return value + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _markup_free(line: str) -> str:
    """One line of SRT/WebVTT cue text as plain text: tags and ASS overrides removed, entities decoded.

    Tags go before entities are decoded, so ``&lt;i&gt;`` stays the literal text ``<i>``.
    """
    return html.unescape(_TAG.sub("", _SRT_ASS_OVERRIDE.sub("", line))).replace("\xa0", " ").strip()


def _join(lines) -> str:
    return " ".join(line.strip() for line in lines if line.strip())


# -- containers ------------------------------------------------------------------------------------
# ffmpeg decodes every text subtitle codec to an ASS event: "ReadOrder,Layer,Style,Name,MarginL,
# MarginR,MarginV,Effect,Text", whatever the track held (mov_text, SubRip, ASS/SSA, WebVTT).
_ASS_EVENT_FIELDS = 9
_ASS_MARKUP = re.compile(r"\\[Nn]|\\h|\{[^{}]*\}")  # line breaks, hard spaces, override blocks
_ASS_ESCAPES = {"\\N": "\n", "\\n": "\n", "\\h": " "}
_HTML_CODECS = {"subrip", "srt"}  # ffmpeg's SubRip decoder keeps unknown tags and entities as text
_TEXT_CODECS = {"mov_text", "subrip", "srt", "ass", "ssa", "webvtt", "text"}  # without codec.text_sub


def container_subtitles(source: str | os.PathLike | bytes) -> list[Cue] | None:
    """The cues of a video's first text subtitle track (None when it has none).

    Times are relative to the first video frame, as the sampled frames' timestamps are (the
    frame reader counts from 0). Bitmap tracks (DVD, PGS) are skipped: they hold pictures of text.
    """
    import av

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        container = av.open(handle)
    except (av.error.FFmpegError, OSError) as exc:  # FFmpegError: InvalidDataError & co
        raise SubtitleError(f"cannot read subtitles: not a media file ({exc})") from exc
    with container:
        stream = next((s for s in container.streams.subtitles if _is_text(s)), None)
        if stream is None:
            return None
        origin = _video_origin(container)
        cues: list[Cue] = []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                base = packet.time_base or stream.time_base
                start = packet.pts * base - origin  # exact fractions: 3.3 s stays 3.3, not 3.3000000000000007
                end = start + (packet.duration or 0) * base
                text = _join(_ass_text(rect.ass, stream.codec_context.name) for rect in _rects(packet.decode()))
                if text:  # MP4 muxers fill the gaps between cues with empty samples
                    cues.append(Cue(float(max(start, 0)), float(max(end, 0)), text))
        except av.error.FFmpegError as exc:
            raise SubtitleError(f"cannot read the subtitle track: {exc}") from exc
    return cues


def _is_text(stream) -> bool:
    codec = stream.codec_context.codec
    text_sub = getattr(codec, "text_sub", None)  # PyAV >= 14 exposes ffmpeg's AV_CODEC_PROP_TEXT_SUB
    return bool(text_sub) if text_sub is not None else codec.name in _TEXT_CODECS


def _rects(decoded) -> list:
    """The text rectangles of decoded subtitles (PyAV yields them directly, older releases in sets)."""
    out = []
    for item in decoded:
        out.extend([item] if hasattr(item, "ass") else list(item))
    return [rect for rect in out if getattr(rect, "ass", None)]


def _video_origin(container) -> Fraction:
    video = next(iter(container.streams.video), None)
    if video is None or video.start_time is None or video.time_base is None:
        return Fraction(0)
    return video.start_time * Fraction(video.time_base)


def _ass_text(event: bytes, codec: str) -> str:
    """An ASS event's text as plain text: override blocks dropped, ``\\N`` line breaks joined by a space."""
    text = event.decode("utf-8", errors="replace").split(",", _ASS_EVENT_FIELDS - 1)[-1]
    lines = _ASS_MARKUP.sub(lambda m: _ASS_ESCAPES.get(m.group(), ""), text).split("\n")
    if codec in _HTML_CODECS:
        lines = [_markup_free(line) for line in lines]
    return _join(lines)


# -- frames ----------------------------------------------------------------------------------------
def to_webvtt(cues: list[Cue]) -> str:
    """Cues as a WebVTT file, for a player's subtitle track (the text as the model reads it)."""

    def stamp(seconds: float) -> str:
        ms = round(max(0.0, seconds) * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"

    def escaped(text: str) -> str:  # WebVTT cue text is markup: "<" opens a tag, "&" an entity
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    blocks = [f"{stamp(c.start)} --> {stamp(c.end)}\n{escaped(c.text)}" for c in cues if c.text.strip()]
    return "WEBVTT\n\n" + "".join(block + "\n\n" for block in blocks)


def frame_texts(cues: list[Cue], timestamps: list[float]) -> list[list[str]]:
    """Per sampled frame, the texts of the cues assigned to it (``extract_video_features_subtitles.py``).

    The official ``load_video_input``: cues in order, one pointer that only moves forward while
    ``timestamps[ptr] < cue.end``, the text attached to frame ``ptr - 1``: the last sampled frame
    strictly before the cue's end, so a line is read after the frames it was spoken over.
    """
    texts: list[list[str]] = [[] for _ in timestamps]
    ptr = 0
    for cue in cues:
        while ptr < len(timestamps) and timestamps[ptr] < cue.end:
            ptr += 1
        text = cue.text.removeprefix(" ")  # as the script does to Whisper's text
        if not texts or not text.strip():
            continue
        # A cue that ends at or before the first frame leaves ptr at 0, and the official
        # texts[ptr - 1] then puts it on the LAST frame, far from where it was said. We put it on
        # the first frame, the sampled frame nearest to it.
        texts[max(ptr - 1, 0)].append(text)
    return texts
