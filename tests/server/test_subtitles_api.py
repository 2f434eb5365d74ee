"""Subtitles through the real service: uploaded, sent with a question, read from the container, or
transcribed; each lands after the right frame, as ``llamavid prompt`` shows.

The served prompt is not returned, but its length is (``usage.prompt_tokens``), and the CLI's
prompt tokenizes to exactly that length only when every subtitle is where the CLI put it (a cue
attached to another frame changes the tokenization at both frames' boundaries, and a lost or
doubled cue changes the count outright). Greedy answers of two routes to the same prompt are
compared too.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest

from model.subtitles import parse_subtitles
from model.tokenizer import LlamaTextTokenizer
from server.cli import main as cli
from tests.model.checkpoints import clone, edit_config
from tests.model.media import write_media
from tests.model.tiny_whisper import make_tiny_whisper
from tests.server.live import scrape, wait_ready_video
from tests.serving import Process, start_server

QUESTION = "What does the man say?"
# 4 s at 1 fps: frames at 0, 1, 2, 3 s. A cue goes to the last frame strictly before its end.
CUES = [(0.2, 1.5, "Hello there."), (1.6, 2.0, "Who are you?"), (2.2, 3.6, "Goodbye now.")]
SRT = "".join(f"{i + 1}\n00:00:0{a:.3f} --> 00:00:0{b:.3f}\n{text}\n\n".replace(".", ",", 2)
              for i, (a, b, text) in enumerate(CUES))
VTT = "WEBVTT\n\n" + "".join(f"00:0{a:.3f} --> 00:0{b:.3f}\n{text}\n\n" for a, b, text in CUES)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("subtitled")
    (folder / "subs.srt").write_text(SRT)
    return {
        "plain": write_media(folder / "plain.mp4", seconds=4.0),
        "mkv": write_media(folder / "subrip.mkv", seconds=4.0, cues=CUES, subtitle_codec="subrip"),
        "mp4": write_media(folder / "movtext.mp4", seconds=4.0, cues=CUES, subtitle_codec="mov_text"),
        "speech": write_media(folder / "speech.mp4", seconds=4.0, audio=True),
        "srt": folder / "subs.srt",
    }


@pytest.fixture(scope="module")
def long_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint as a stage-3 long-video one (linear RoPE x16 marks it)."""
    ckpt = clone(tiny_checkpoint, tmp_path_factory.mktemp("long") / "llama-vid-tiny-long-video")
    edit_config(ckpt, rope_scaling={"type": "linear", "factor": 16.0}, max_token=8192)
    return ckpt


@pytest.fixture(scope="module")
def long_server(long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("long-server")
    whisper = make_tiny_whisper(folder / "whisper-tiny-random")
    server = start_server(folder, long_checkpoint, asr_model=whisper)
    yield server
    server.stop()


def cli_prompt(checkpoint: Path, video: Path, *args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli(["prompt", "--model", str(checkpoint), *args, str(video), QUESTION]) == 0
    return out.getvalue().removesuffix("\n")


def prompt_tokens(checkpoint: Path, text: str) -> int:
    return len(LlamaTextTokenizer(checkpoint / "tokenizer.model").encode_with_images(text))


def upload(http: httpx.Client, video: Path, **data) -> str:
    files = {"file": (video.name, video.read_bytes(), "video/mp4")}
    if "subtitles_file" in data:
        path = data.pop("subtitles_file")
        files["subtitles"] = (path.name, path.read_bytes(), "application/x-subrip")
    reply = http.post("/v1/videos", files=files, data=data)
    assert reply.status_code == 202, reply.text
    return wait_ready_video(http, reply.json()["id"])["id"]


def ask(http: httpx.Client, video_id: str, **body) -> dict:
    reply = http.post("/v1/ask", json={"video_id": video_id, "question": QUESTION, "max_tokens": 4, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_an_uploaded_srt_lands_after_the_right_frames(server: Process, tiny_checkpoint: Path, media) -> None:
    cli_text = cli_prompt(tiny_checkpoint, media["plain"], "--subtitles", str(media["srt"]))
    frame = "<image>" * 2  # two tokens per frame
    # frames 0 1 2 3 s: both cues ending by 2.0 s go to frame 1 (strictly before their end), the
    # last one to frame 3; frame 2 has none
    assert f"{frame * 2}Hello there. Who are you?{frame * 2}Goodbye now.\n{QUESTION}" in cli_text
    with httpx.Client(base_url=server.url, timeout=60) as http:
        video_id = upload(http, media["plain"], subtitles_file=media["srt"])
        assert http.get(f"/v1/videos/{video_id}").json()["subtitles"] is True
        with_file = ask(http, video_id)
        assert with_file["subtitles"] == {"source": "file", "cues": 3}
        assert with_file["usage"]["prompt_tokens"] == prompt_tokens(tiny_checkpoint, cli_text)
        assert (with_file["frames_used"], with_file["frames_total"]) == (4, 4)

        # turned off for one question; the video keeps its subtitles for the next
        off = ask(http, video_id, subtitles="none")
        plain_text = cli_prompt(tiny_checkpoint, media["plain"], "--subtitles", "none")
        assert off["subtitles"] is None and off["usage"]["prompt_tokens"] == prompt_tokens(tiny_checkpoint, plain_text)
        assert ask(http, video_id)["usage"] == with_file["usage"]

        # the same cues sent with the question, as SRT text, WebVTT text or a data: URL, about the
        # same bytes uploaded without subtitles: the same prompt, so the same greedy answer
        bare = upload(http, media["plain"])
        assert bare != video_id and http.get(f"/v1/videos/{bare}").json()["subtitles"] is False
        data_url = "data:text/vtt;base64," + base64.b64encode(VTT.encode()).decode()
        for subtitles in (SRT, VTT, data_url):
            same = ask(http, bare, subtitles=subtitles)
            assert (same["usage"], same["answer"], same["subtitles"]) == \
                (with_file["usage"], with_file["answer"], with_file["subtitles"])


def test_subtitles_fetched_from_a_url_pass_the_media_guard(server: Process, tiny_checkpoint: Path, media,
                                                            media_host) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = http.post("/v1/videos", json={"url": media_host.media(media["plain"]),
                                              "subtitles": media_host.media(media["srt"])})
        assert reply.status_code == 202, reply.text
        video_id = wait_ready_video(http, reply.json()["id"])["id"]
        answer = ask(http, video_id)
    cli_text = cli_prompt(tiny_checkpoint, media["plain"], "--subtitles", str(media["srt"]))
    assert answer["subtitles"] == {"source": "file", "cues": 3}
    assert answer["usage"]["prompt_tokens"] == prompt_tokens(tiny_checkpoint, cli_text)


def test_mkv_subrip_and_mp4_mov_text_tracks_give_the_uploaded_files_prompt(server: Process, tiny_checkpoint: Path,
                                                                           media) -> None:
    expected = prompt_tokens(tiny_checkpoint, cli_prompt(tiny_checkpoint, media["plain"], "--subtitles",
                                                         str(media["srt"])))
    before = scrape(server.url)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name in ("mkv", "mp4"):
            video_id = upload(http, media[name])
            # a short-video checkpoint was trained without subtitles: the track is used when asked
            assert ask(http, video_id)["subtitles"] is None
            answer = ask(http, video_id, subtitles="auto")
            assert answer["subtitles"] == {"source": "container", "cues": 3}, name
            assert answer["usage"]["prompt_tokens"] == expected, name
            assert prompt_tokens(tiny_checkpoint, cli_prompt(tiny_checkpoint, media[name], "--subtitles", "auto")) \
                == expected
            ask(http, video_id, subtitles="auto")  # read back, not demuxed again
    after = scrape(server.url)
    assert before.delta(after, ("llamavid_video_subtitles_total", {"source": "container"})) == 2


def test_a_long_video_checkpoint_reads_the_track_unasked(long_server: Process, long_checkpoint: Path,
                                                         media) -> None:
    with httpx.Client(base_url=long_server.url, timeout=60) as http:
        assert http.get("/v1/models").json()["data"][0]["llamavid"]["long_video"] is True
        video_id = upload(http, media["mkv"])
        answer = ask(http, video_id)
        assert answer["subtitles"] == {"source": "container", "cues": 3}
        movie = cli_prompt(long_checkpoint, media["mkv"])
        assert "Hello there." in movie and answer["usage"]["prompt_tokens"] == prompt_tokens(long_checkpoint, movie)
        off = ask(http, video_id, subtitles="none")
        assert off["subtitles"] is None
        assert off["usage"]["prompt_tokens"] == prompt_tokens(long_checkpoint, cli_prompt(
            long_checkpoint, media["mkv"], "--subtitles", "none"))


def test_speech_to_text_for_a_video_without_subtitles_runs_once(long_server: Process, media) -> None:
    """A tiny random Whisper: the code path (decode the audio, transcribe, filter by log-prob, cache),
    not the transcript's quality."""
    before = scrape(long_server.url)
    with httpx.Client(base_url=long_server.url, timeout=120) as http:
        video_id = upload(http, media["speech"])
        first = ask(http, video_id)
        second = ask(http, video_id, max_tokens=2)
    after = scrape(long_server.url)
    assert first["subtitles"] == second["subtitles"] and first["subtitles"]["source"] == "asr"
    assert before.delta(after, ("llamavid_video_subtitles_total", {"source": "asr"})) == 1
    assert before.delta(after, "llamavid_audio_seconds_transcribed_total") == pytest.approx(4.0, abs=0.1)
    # no audio, no track: nothing to transcribe, and the question still answers
    with httpx.Client(base_url=long_server.url, timeout=60) as http:
        silent = ask(http, upload(http, media["plain"]))
    assert silent["subtitles"] is None


def test_the_player_gets_the_videos_subtitles_as_webvtt(server: Process, media) -> None:
    """``/v1/videos/{id}/subtitles.vtt``: the uploaded file, else the container's track, else 404."""
    expected = CUES
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for video, extra in ((media["plain"], {"subtitles_file": media["srt"]}), (media["mkv"], {}),
                             (media["mp4"], {})):
            video_id = upload(http, video, **extra)
            reply = http.get(f"/v1/videos/{video_id}/subtitles.vtt")
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/vtt"), video
            cues = parse_subtitles(reply.text)
            assert [c.text for c in cues] == [text for _, _, text in expected], video
            assert [(c.start, c.end) for c in cues] == [(a, b) for a, b, _ in expected], video
        bare = http.get(f"/v1/videos/{upload(http, media['plain'])}/subtitles.vtt")
        assert bare.status_code == 404 and bare.json()["error"]["code"] == "no_subtitles"
