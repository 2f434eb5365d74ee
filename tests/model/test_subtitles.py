"""Subtitles: SRT / WebVTT parsing, container tracks, and the official per-frame assignment (spec §6.3)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from model.subtitles import (
    Cue,
    SubtitleError,
    container_subtitles,
    frame_texts,
    load_subtitles,
    parse_subtitles,
)
from tests.model.media import write_media

# The same three cues as SRT, WebVTT and ASS events (what the container tracks are encoded from).
SRT = """1
00:00:00,500 --> 00:00:01,500
<i>Hello</i> &amp; welcome

2
00:00:02,000 --> 00:00:03,250
{\\an8}Two lines
<b>of text</b>

3
00:00:03,300 --> 00:00:03,900
<font color="#ff0000">the end</font>
"""
VTT = """WEBVTT - three cues
Kind: captions

NOTE made for the tests
over two lines

STYLE
::cue { color: yellow }

intro
00:00.500 --> 00:01.500 align:start position:10%
<v Narrator>Hello</v> &amp; welcome

00:00:02.000 --> 00:00:03.250 line:0
<c.top>Two lines</c>
<i>of text</i>

00:03.300 --> 00:03.900
<lang en>the end</lang>
"""
ASS_EVENTS = [(0.5, 1.5, r"{\i1}Hello{\i0} & welcome"), (2.0, 3.25, r"{\an8}Two lines\N{\b1}of text{\b0}"),
              (3.3, 3.9, r"{\c&H0000FF&}the end")]
EXPECTED = [Cue(0.5, 1.5, "Hello & welcome"), Cue(2.0, 3.25, "Two lines of text"), Cue(3.3, 3.9, "the end")]


# -- parsing ---------------------------------------------------------------------------------------
def test_srt_and_vtt() -> None:
    assert parse_subtitles(SRT) == EXPECTED
    assert parse_subtitles(VTT) == EXPECTED


@pytest.mark.parametrize("variant", [
    lambda t: "\ufeff" + t,  # BOM
    lambda t: t.replace("\n", "\r\n"),  # CRLF
    lambda t: t.replace("\n", "\r"),  # old Mac line ends
    lambda t: t.rstrip("\n"),  # no trailing blank line
    lambda t: t + "\n\n\n",  # extra blank lines
], ids=["bom", "crlf", "cr", "no-trailing-newline", "trailing-blanks"])
@pytest.mark.parametrize("text", [SRT, VTT], ids=["srt", "vtt"])
def test_line_ends_and_boms(text: str, variant) -> None:
    assert parse_subtitles(variant(text)) == EXPECTED


def test_hours() -> None:
    srt = "1\n100:00:01,000 --> 100:00:02,5\nlong movie\n\n2\n1:02:03.04 --> 1:02:04,000\nshort hours\n"
    assert parse_subtitles(srt) == [Cue(360001.0, 360002.5, "long movie"), Cue(3723.04, 3724.0, "short hours")]
    vtt = "WEBVTT\n\n01:02.500 --> 01:03.000\nno hours\n\n123:00:00.000 --> 123:00:01.000\nmany hours\n"
    assert parse_subtitles(vtt) == [Cue(62.5, 63.0, "no hours"), Cue(442800.0, 442801.0, "many hours")]


def test_srt_without_numbers_or_blank_lines() -> None:
    srt = ("00:00:01,000 --> 00:00:02,000\nno number\n"
           "2\n00:00:03,000 --> 00:00:04,000\nno blank line before\n"
           "00:00:05,000 --> 00:00:06,000\nnor here\n\n"
           "4\n00:00:07,000 --> 00:00:08,000\na blank line\n\ninside the text\n")
    assert [c.text for c in parse_subtitles(srt)] == ["no number", "no blank line before", "nor here",
                                                      "a blank line inside the text"]


def test_markup_and_entities() -> None:
    srt = ("1\n00:00:01,000 --> 00:00:02,000\n"
           "{\\an8}{\\pos(10,20)}<font face=\"Arial\" color=#fff>Tom &amp; Jerry</font>\n"
           "<u>I &lt;3 you</u> &quot;really&quot;&nbsp;&#233;t&eacute;\n\n"
           "2\n00:00:03,000 --> 00:00:04,000\nI <3 you, 2 < 3 > 1\n\n"
           "3\n00:00:05,000 --> 00:00:06,000\n<i></i>\n")
    assert [c.text for c in parse_subtitles(srt)] == [
        'Tom & Jerry I <3 you "really" été',  # decoded entities are text, never markup
        "I <3 you, 2 < 3 > 1",  # a lone "<" is not a tag
    ]  # the third cue has no text left and is dropped
    vtt = ("WEBVTT\n\n00:01.000 --> 00:02.000\n<v.loud Bob>Hi</v> <c.a.b>there</c> "
           "<ruby>kan<rt>ji</rt></ruby> <00:01.500>late\n")
    assert parse_subtitles(vtt)[0].text == "Hi there kanji late"


def test_vtt_header_and_blocks() -> None:
    vtt = ("WEBVTT\nX-TIMESTAMP-MAP=LOCAL:00:00:00.000,MPEGTS:0\n\n"
           "REGION\nid:fred width:40%\n\n"
           "NOTE a note\n\n"
           "cue-1\n00:01.000 --> 00:02.000 region:fred\nfirst\n\n"
           "stray text without timing\n\n"
           "00:03.000 --> 00:04.000\nsecond\n")
    assert parse_subtitles(vtt) == [Cue(1.0, 2.0, "first"), Cue(3.0, 4.0, "second")]


@pytest.mark.parametrize(("text", "message"), [
    ("", "line 1: the subtitle text is empty"),
    ("  \n\n", "line 1: the subtitle text is empty"),
    ("just some prose\nthat is not subtitles\n", "line 1: expected a cue number"),
    ('{"cues": []}', "line 1: expected a cue number"),
    ("\n\n1\n00:00:01,000 -> 00:00:02,000\nx\n", "line 4: malformed timing"),
    ("1\n00:00:01,000 --> 00:00:02,000\nx\n\n2\n00:00:03 --> soon\ny\n", "line 6: malformed timing"),
    ("WEBVTT\n\n00:01.000 --> 00:0x.000\nx\n", "line 3: malformed timing"),
    ("1\n00:00:05,000 --> 00:00:02,000\nbackwards\n", "line 2: the cue ends"),
    ("WEBVTTX\n\n00:01.000 --> 00:02.000\nx\n", "line 1: expected a cue number"),  # not the signature
], ids=["empty", "blank", "prose", "json", "arrow", "bad-time", "vtt-bad-time", "backwards", "bad-signature"])
def test_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(SubtitleError, match=message) as info:
        parse_subtitles(text)
    assert isinstance(info.value, ValueError)


def test_load_subtitles_encodings(tmp_path: Path) -> None:
    srt = "1\n00:00:01,000 --> 00:00:02,000\nCafé déjà vu\n"
    expected = [Cue(1.0, 2.0, "Café déjà vu")]
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "cp1252"):
        data = srt.encode(encoding)
        assert load_subtitles(data) == expected, encoding
        (tmp_path / "subs.srt").write_bytes(data)
        assert load_subtitles(tmp_path / "subs.srt") == expected, encoding


# -- containers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "mov_text"), (".mkv", "subrip"), (".mkv", "ass"),
                                               (".mkv", "webvtt")])
def test_container_track_equals_the_srt(tmp_path: Path, suffix: str, codec: str) -> None:
    video = write_media(tmp_path / f"clip{suffix}", cues=ASS_EVENTS, subtitle_codec=codec)
    cues = container_subtitles(video)
    assert cues == parse_subtitles(SRT) == EXPECTED
    assert container_subtitles(video.read_bytes()) == cues  # bytes, as the service holds an upload


def test_container_without_a_text_track(tmp_path: Path) -> None:
    assert container_subtitles(write_media(tmp_path / "plain.mp4")) is None
    assert container_subtitles(write_media(tmp_path / "audio.mkv", audio=True)) is None
    with pytest.raises(SubtitleError, match="not a media file"):
        container_subtitles(b"this is not a video")


def test_the_first_text_track_wins(tmp_path: Path) -> None:
    import av

    path = tmp_path / "two.mkv"
    first, second = write_media(tmp_path / "a.mkv", cues=ASS_EVENTS[:1], subtitle_codec="subrip"), \
        write_media(tmp_path / "b.mkv", cues=ASS_EVENTS[1:], subtitle_codec="ass", video=False)
    with av.open(str(first)) as a, av.open(str(second)) as b, av.open(str(path), "w") as out:
        streams = {s: out.add_stream_from_template(s) for s in (*a.streams, *b.streams)}
        for source in (a, b):
            for packet in source.demux():
                if packet.size:
                    packet.stream = streams[packet.stream]
                    out.mux(packet)
    assert container_subtitles(path) == EXPECTED[:1]


def test_times_count_from_the_first_video_frame(tmp_path: Path) -> None:
    """A stream whose timeline starts at 10 s (an MPEG-TS cut, a recording): the sampled frames'
    times count from its first frame, so the cues' must too."""
    import av

    source = write_media(tmp_path / "a.mkv", cues=ASS_EVENTS, subtitle_codec="subrip")
    path = tmp_path / "late.mkv"
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        streams = {s: out.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.size:
                packet.pts += 10_000  # the streams' time base is 1 ms
                packet.dts = None if packet.dts is None else packet.dts + 10_000
                packet.stream = streams[packet.stream]
                out.mux(packet)
    with av.open(str(path)) as check:
        assert check.streams.video[0].start_time == 10_000
    assert container_subtitles(path) == EXPECTED


# -- frames ----------------------------------------------------------------------------------------
def official_load_video_input(subtitles: list[dict], frame_time: list[float]) -> list[list[str]]:
    """``extract_video_features_subtitles.py::load_video_input``, up to building the text list."""
    point = 0
    text_list = [[] for i in range(len(frame_time))]
    for item in subtitles:
        end_time = item['end_time']
        text = item['text']
        while point < len(frame_time) and frame_time[point] < end_time:
            point += 1
        text_list[point - 1].append(text)
    return text_list


def test_frame_texts_worked_example() -> None:
    times = [0.0, 1.0, 2.0, 3.0]
    cues = [Cue(0.0, 0.5, "A"),  # ends before frame 1: frame 0
            Cue(0.2, 1.0, "B"),  # ends exactly at frame 1's time: the last frame *strictly* before, frame 0
            Cue(1.1, 2.5, "C"),  # frames 1 and 2 are before its end: frame 2
            Cue(2.2, 2.6, "D"),  # the same frame: several cues on one frame, in cue order
            Cue(2.7, 9.0, "E"),  # past the last frame: the last frame
            Cue(4.0, 5.0, "F"),  # ends before E: the pointer never moves back, so the last frame too
            Cue(5.0, 6.0, " "),  # empty once the leading space goes: skipped
            Cue(6.0, 7.0, "  two spaces")]  # one leading space stripped, as the script does
    assert frame_texts(cues, times) == [["A", "B"], [], ["C", "D"], ["E", "F", " two spaces"]]


def test_frame_texts_first_frame_case() -> None:
    """MovieNet-style keyframes whose first one is not at t=0: a cue that ends at or before it
    would land on the LAST frame in the official code; it goes to the first one here."""
    times = [1.0, 2.0, 3.0]
    cues = [Cue(0.0, 0.8, "before"), Cue(0.5, 1.0, "at"), Cue(1.0, 2.5, "later")]
    assert official_load_video_input([{"end_time": c.end, "text": c.text} for c in cues], times) == \
        [[], ["later"], ["before", "at"]]
    assert frame_texts(cues, times) == [["before", "at"], ["later"], []]


def test_frame_texts_matches_the_official_code() -> None:
    """Wherever the official pointer cannot wrap (first frame at 0, every cue ending after it), the
    assignment is the official one, on random cue lists and frame grids."""
    rng = random.Random(0)
    for _ in range(200):
        step = rng.choice([0.5, 1.0, 1.001, 2.0])
        times = [i * step for i in range(rng.randint(1, 12))]
        ends = sorted(round(rng.uniform(0.01, 14.0), 2) for _ in range(rng.randint(0, 10)))
        cues = [Cue(max(0.0, end - 1.0), end, f"t{i}") for i, end in enumerate(ends)]
        official = official_load_video_input([{"end_time": c.end, "text": c.text} for c in cues], times)
        assert frame_texts(cues, times) == official


def test_frame_texts_edges() -> None:
    assert frame_texts([Cue(0.0, 1.0, "lost")], []) == []
    assert frame_texts([], [0.0, 1.0]) == [[], []]
