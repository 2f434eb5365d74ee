"""Speech to text with a tiny random Whisper made here (``tests/model/tiny_whisper.py``).

A random model says nothing meaningful, so these tests check the code path: audio decoding,
short and long-form generation, segment times, the official confidence filter (``avg_logprob``
below -2 dropped, checked on crafted scores and against the real generation scores) and errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model import asr
from model.asr import (
    AudioDecodeError,
    Whisper,
    WhisperModelError,
    avg_logprob,
    decode_audio,
    segment_logprob,
    segments_to_cues,
    transcribe,
)
from model.subtitles import Cue
from tests.model.media import write_media
from tests.model.tiny_whisper import make_tiny_whisper


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "whisper-tiny-random")


@pytest.fixture(scope="module")
def whisper(whisper_dir: Path) -> Whisper:
    return Whisper.load(whisper_dir)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """65 s of a tone: more than two 30 s windows, so generation runs long-form."""
    return write_media(tmp_path_factory.mktemp("clips") / "long.mkv", seconds=65.0, fps=1, audio=True)


def test_the_tiny_whisper_folder(whisper_dir: Path, whisper: Whisper) -> None:
    names = {p.name for p in whisper_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "added_tokens.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    tok = whisper.processor.tokenizer
    eot, no_ts = tok.convert_tokens_to_ids(["<|endoftext|>", "<|notimestamps|>"])
    assert tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [no_ts + 1, no_ts + 1501]
    assert whisper.model.config.vocab_size == len(tok) == no_ts + 1502 and eot < no_ts
    assert whisper.model.generation_config.no_timestamps_token_id == no_ts
    assert tok.decode(tok(" the cat sat").input_ids, skip_special_tokens=True) == " the cat sat"


# -- audio -----------------------------------------------------------------------------------------
def test_decode_audio(tmp_path: Path) -> None:
    clip = write_media(tmp_path / "tone.mp4", seconds=3.0, audio=True)
    audio = decode_audio(clip)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) / asr.SAMPLE_RATE == pytest.approx(3.0, abs=0.1)  # resampled 44.1 kHz stereo -> 16 kHz mono
    peak = np.argmax(np.abs(np.fft.rfft(audio))) * asr.SAMPLE_RATE / len(audio)
    assert peak == pytest.approx(440, abs=3)
    np.testing.assert_array_equal(decode_audio(clip.read_bytes()), audio)
    assert decode_audio(write_media(tmp_path / "silent-film.mp4")) is None
    with pytest.raises(AudioDecodeError, match="not a media file"):
        decode_audio(b"not a video")


# -- transcription ---------------------------------------------------------------------------------
def _check_times(cues: list[Cue], duration: float) -> None:
    for cue in cues:
        assert 0.0 <= cue.start <= cue.end <= duration, cue
        assert isinstance(cue.text, str) and cue.text.strip()
    assert [c.start for c in cues] == sorted(c.start for c in cues)


def test_long_audio(whisper: Whisper, long_clip: Path, monkeypatch) -> None:
    seen: list[list[dict]] = []
    original = asr.segments_to_cues
    monkeypatch.setattr(asr, "segments_to_cues", lambda segments, *a, **k: seen.append(segments) or original(
        segments, *a, **k))
    duration = len(decode_audio(long_clip)) / asr.SAMPLE_RATE
    everything = whisper.transcribe(long_clip, min_logprob=-math.inf)
    _check_times(everything, duration)
    assert everything and max(c.end for c in everything) > 30  # past the first window
    segments = seen[0]
    assert len({id(s["result"]) for s in segments}) >= 3  # one generate call per window
    for segment in segments:
        # Greedy decoding chose each token as the argmax of its score row: the rows line up.
        first, last = segment["idxs"]
        scores, sequence = segment["result"]["scores"], segment["result"]["sequences"]
        rows = scores[first - (len(sequence) - len(scores)):last - (len(sequence) - len(scores))]
        assert [int(r.argmax()) for r in rows] == segment["tokens"].tolist()

    # The official threshold keeps exactly the segments at or above -2.
    kept = whisper.transcribe(long_clip)
    confident = [s for s in segments if segment_logprob(s) >= asr.MIN_LOGPROB]
    assert 0 < len(confident) < len(segments)  # the random model is unsure of some segments only
    assert kept == original(confident, lambda ids: whisper.processor.tokenizer.decode(ids, skip_special_tokens=True),
                            duration, min_logprob=-math.inf)
    assert whisper.transcribe(long_clip, min_logprob=math.inf) == []


def test_short_audio_and_the_convenience_function(whisper_dir: Path, whisper: Whisper, tmp_path: Path) -> None:
    clip = write_media(tmp_path / "short.mp4", seconds=20.0, fps=2, audio=True)
    cues = whisper.transcribe(clip.read_bytes(), min_logprob=-math.inf)
    _check_times(cues, 20.1)
    assert transcribe(clip, whisper_dir, min_logprob=-math.inf) == cues
    assert transcribe(clip, whisper_dir, language="fr", min_logprob=-math.inf) is not None


def test_no_audio(whisper: Whisper, tmp_path: Path) -> None:
    assert whisper.transcribe(write_media(tmp_path / "silent-film.mp4")) is None


# -- the confidence filter on crafted scores -------------------------------------------------------
VOCAB = 8


def _row(token: int, logprob: float) -> torch.Tensor:
    """Logits whose softmax gives ``token`` the probability exp(logprob), the rest evenly."""
    p = math.exp(logprob)
    probs = torch.full((VOCAB,), (1 - p) / (VOCAB - 1), dtype=torch.float64)
    probs[token] = p
    return probs.log().float() + 3.0  # any shift: log-softmax undoes it


def _window(segments: list[tuple[float, float, list[tuple[int, float]]]], prompt: int = 3) -> list[dict]:
    """Segments of one generate call: (start, end, [(token, its log-prob)])."""
    tokens = [t for _, _, steps in segments for t, _ in steps]
    result = {"sequences": torch.tensor([7] * prompt + tokens),
              "scores": [_row(t, lp) for _, _, steps in segments for t, lp in steps]}
    out, at = [], prompt
    for start, end, steps in segments:
        out.append({"start": torch.tensor(start, dtype=torch.float64), "end": torch.tensor(end, dtype=torch.float64),
                    "tokens": torch.tensor([t for t, _ in steps]), "idxs": (at, at + len(steps)), "result": result})
        at += len(steps)
    return out


def test_avg_logprob() -> None:
    assert avg_logprob([_row(2, -1.0), _row(5, -3.0)], [2, 5]) == pytest.approx(-2.0, abs=1e-5)
    assert avg_logprob([_row(2, -0.5)], [2]) == pytest.approx(-0.5, abs=1e-5)
    with pytest.raises(ValueError, match="2 tokens but 1 score"):
        avg_logprob([_row(2, -1.0)], [2, 3])


def test_segments_to_cues_drops_unsure_segments() -> None:
    segments = _window([
        (0.0, 2.0, [(1, -1.0), (2, -2.9)]),  # mean -1.95: kept
        (2.0, 3.0, [(3, -2.5)]),  # mean -2.5: dropped
        (3.0, 5.0, [(4, -0.1), (5, -0.2)]),  # kept
    ]) + _window([
        (30.0, 31.0, [(6, -1.9999)]),  # just above the threshold: kept
        (31.0, 33.0, [(1, -3.9002), (2, -0.1)]),  # mean -2.0001, just below: dropped
        (33.0, 40.0, [(3, -0.3)]),  # runs past the audio's end: clamped
        (41.0, 42.0, [(4, -0.3)]),  # starts after it: dropped
    ])
    assert [segment_logprob(s) for s in segments] == pytest.approx([-1.95, -2.5, -0.15, -1.9999, -2.0001, -0.3, -0.3],
                                                                   abs=1e-5)
    decode = {1: " Hello", 2: " there", 3: "  General", 4: " Kenobi", 5: "!", 6: " You"}

    def text(ids):
        return "".join(decode[i] for i in ids)

    assert segments_to_cues(segments, text, duration=35.0) == [
        Cue(0.0, 2.0, "Hello there"), Cue(3.0, 5.0, "Kenobi!"), Cue(30.0, 31.0, "You"), Cue(33.0, 35.0, " General")]
    assert [c.text for c in segments_to_cues(segments, text, 35.0, min_logprob=-1.0)] == ["Kenobi!", " General"]
    assert len(segments_to_cues(segments, text, 35.0, min_logprob=-math.inf)) == 6


# -- errors ----------------------------------------------------------------------------------------
def test_not_a_whisper_folder(tmp_path: Path, tiny_checkpoint: Path, whisper_dir: Path) -> None:
    with pytest.raises(WhisperModelError, match="no config.json"):
        Whisper.load(tmp_path)
    with pytest.raises(WhisperModelError, match="model_type 'llava'"):
        Whisper.load(tiny_checkpoint)  # a LLaMA-VID checkpoint
    broken = shutil.copytree(whisper_dir, tmp_path / "no-timestamps")
    generation = json.loads((broken / "generation_config.json").read_text())
    del generation["no_timestamps_token_id"]
    (broken / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(WhisperModelError, match="no_timestamps_token_id"):
        Whisper.load(broken)
    for missing, message in (("model.safetensors", "cannot load"), ("vocab.json", "cannot load"),
                             ("preprocessor_config.json", "cannot load"), ("added_tokens.json", "timestamp tokens")):
        incomplete = shutil.copytree(whisper_dir, tmp_path / f"no-{missing}")
        (incomplete / missing).unlink()
        with pytest.raises(WhisperModelError, match=message):
            Whisper.load(incomplete)
