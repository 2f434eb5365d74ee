"""Speech to text for videos without subtitles: Whisper from a local folder (spec §6.3 step 1).

The official feature script transcribes with openai-whisper ``large``, drops segments whose
average log-probability is below -2 and strips the leading space of each text. This does the
same with transformers' Whisper, read from a folder in the Hugging Face layout
(``config.json``, ``generation_config.json``, weights, tokenizer and ``preprocessor_config.json``)
and never downloaded at run time: a service must not fetch gigabytes in the middle of a request.

Audio longer than 30 s goes through the library's long-form generation, which moves window by
window to the last timestamp Whisper predicted, as openai-whisper does. The average
log-probability is computed per segment from the generation scores, so a hallucinated segment is
dropped without the good ones decoded in the same window (openai-whisper scores a whole window).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from .subtitles import Cue

MIN_LOGPROB = -2.0  # extract_video_features_subtitles.py's MIN_CONFIDENCE
SAMPLE_RATE = 16_000  # what Whisper's feature extractor expects
WINDOW_SECONDS = 30  # Whisper's input window; longer audio needs long-form generation
CHUNK_SECONDS = 600.0  # audio transcribed per step of a long transcription, between progress reports


class WhisperModelError(ValueError):
    """The folder is not a usable Whisper model."""


class AudioDecodeError(ValueError):
    """The bytes are not a media file PyAV can read."""


def decode_audio(source: str | os.PathLike | bytes) -> np.ndarray | None:
    """The first audio stream as 16 kHz mono float32 samples; None when there is no audio stream."""
    import av

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        container = av.open(handle)
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioDecodeError(f"cannot read the audio: not a media file ({exc})") from exc
    chunks: list[np.ndarray] = []
    with container:
        stream = next(iter(container.streams.audio), None)
        if stream is None:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(f"cannot decode the audio: {exc}") from exc
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def avg_logprob(scores: Sequence[torch.Tensor], tokens: Sequence[int]) -> float:
    """Mean log-probability of ``tokens`` under the per-step ``scores`` (the processed logits
    generation chose from, as openai-whisper's ``avg_logprob`` uses the filtered logits)."""
    if len(scores) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} score vectors")
    if not tokens:
        return float("-inf")
    logprobs = torch.log_softmax(torch.stack([s.double() for s in scores]), dim=-1)
    return logprobs.gather(-1, torch.as_tensor(list(tokens)).long()[:, None]).mean().item()


def segment_logprob(segment: Mapping[str, Any]) -> float:
    """``avg_logprob`` of one segment of ``generate(return_segments=True, output_scores=True)``.

    ``segment["idxs"]`` indexes the window's full sequence (decoder prompt included), whose
    generated part lines up with ``segment["result"]["scores"]``.
    """
    result = segment["result"]
    scores, sequence = result["scores"], result["sequences"]
    prompt = len(sequence) - len(scores)
    first, last = segment["idxs"]
    return avg_logprob(scores[first - prompt : last - prompt], [int(t) for t in sequence[first:last]])


def segments_to_cues(
    segments: Sequence[Mapping[str, Any]],
    decode: Callable[[Sequence[int]], str],
    duration: float,
    *,
    min_logprob: float = MIN_LOGPROB,
) -> list[Cue]:
    """Whisper segments -> cues: low-confidence segments dropped, leading space stripped, times
    kept inside the audio (Whisper may predict a timestamp past the end of a short last window)."""
    cues = []
    for segment in segments:
        if segment_logprob(segment) < min_logprob:
            continue
        text = decode([int(t) for t in segment["tokens"]])
        text = text.removeprefix(" ")  # the official script's text[1:]
        start = max(0.0, float(segment["start"]))
        if not text.strip() or start >= duration:
            continue
        cues.append(Cue(start, min(max(float(segment["end"]), start), duration), text))
    return cues


@dataclass
class Whisper:
    model: WhisperForConditionalGeneration
    processor: WhisperProcessor

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> Whisper:
        """A Whisper model folder -> the model in eval mode on ``device`` (fp16 on a GPU)."""
        path = Path(model_dir)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise WhisperModelError(f"{path} is not a Whisper model folder: no config.json")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise WhisperModelError(f"{config_file}: not a model config ({exc})") from exc
        if model_type != "whisper":
            raise WhisperModelError(f"{path} is not a Whisper model: its config.json says model_type {model_type!r}")
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
            model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, TypeError) as exc:
            raise WhisperModelError(f"{path}: cannot load the Whisper model ({exc})") from exc
        no_timestamps = getattr(model.generation_config, "no_timestamps_token_id", None)
        if no_timestamps is None:
            raise WhisperModelError(f"{path}: generation_config.json has no no_timestamps_token_id, so Whisper "
                                    "cannot predict the timestamps subtitles need")
        # Generation reads every id after <|notimestamps|> as a timestamp; decoding must agree.
        if processor.tokenizer.convert_tokens_to_ids("<|0.00|>") != no_timestamps + 1:
            raise WhisperModelError(f"{path}: the tokenizer lacks Whisper's timestamp tokens (<|0.00|> must follow "
                                    "<|notimestamps|>): incomplete tokenizer files (added_tokens.json?)")
        model.requires_grad_(False)
        return cls(model.to(device).eval(), processor)

    def transcribe(self, source: str | os.PathLike | bytes, *, language: str | None = None,
                   min_logprob: float = MIN_LOGPROB, progress: Callable[[float, float], None] | None = None,
                   chunk_seconds: float = CHUNK_SECONDS) -> list[Cue] | None:
        """A media file's speech as cues; None when it has no audio stream (a silent film has no
        transcript, where a soundtrack without confident speech has an empty one).

        Long audio is transcribed ``chunk_seconds`` at a time so that ``progress(seconds done,
        seconds total)`` can report an hour-long transcription as it goes; a word cut by a chunk
        boundary may be lost, once every ten minutes by default.
        """
        audio = decode_audio(source)
        if audio is None:
            return None
        if audio.size == 0:
            return []
        step = max(int(chunk_seconds * SAMPLE_RATE), WINDOW_SECONDS * SAMPLE_RATE)
        total = len(audio) / SAMPLE_RATE
        cues: list[Cue] = []
        for start in range(0, len(audio), step):
            offset = start / SAMPLE_RATE
            for cue in self.transcribe_audio(audio[start : start + step], language=language, min_logprob=min_logprob):
                cues.append(Cue(cue.start + offset, cue.end + offset, cue.text))
            if progress is not None:
                progress(min(total, offset + step / SAMPLE_RATE), total)
        return cues

    @torch.inference_mode()
    def transcribe_audio(self, audio: np.ndarray, *, language: str | None = None,
                         min_logprob: float = MIN_LOGPROB) -> list[Cue]:
        """16 kHz mono samples -> cues. ``language`` None detects it, as the official script does."""
        long_form = len(audio) > WINDOW_SECONDS * SAMPLE_RATE
        # Short audio is padded to one 30 s window; long audio keeps its length for long-form generation.
        padding = {"truncation": False, "padding": "longest"} if long_form else {}
        inputs = self.processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True,
                                **padding)
        device = self.model.device
        multilingual = getattr(self.model.generation_config, "is_multilingual", False)
        out = self.model.generate(
            inputs.input_features.to(device, self.model.dtype),
            attention_mask=inputs.attention_mask.to(device),
            return_timestamps=True,
            return_segments=True,
            return_dict_in_generate=True,
            output_scores=True,
            **({"task": "transcribe", "language": language} if multilingual else {}),
        )
        tokenizer = self.processor.tokenizer
        return segments_to_cues(out["segments"][0], lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                len(audio) / SAMPLE_RATE, min_logprob=min_logprob)


def transcribe(source: str | os.PathLike | bytes, model_dir: str | os.PathLike, *,
               device: str | torch.device = "cpu", language: str | None = None,
               min_logprob: float = MIN_LOGPROB) -> list[Cue] | None:
    """``Whisper.load(model_dir).transcribe(source)``, keeping the last model loaded for the next call."""
    return _loaded(str(Path(model_dir).resolve()), str(device)).transcribe(
        source, language=language, min_logprob=min_logprob)


@lru_cache(maxsize=1)
def _loaded(model_dir: str, device: str) -> Whisper:
    return Whisper.load(model_dir, device=device)
