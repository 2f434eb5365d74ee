"""A video question's subtitles: a file the client sent, the video's own track, or a transcript.

The track and the transcript depend only on the video's bytes (and the ASR model), so they are
worked out once per video and kept in the media store under a key derived from the video's
digest, like its features: every later question skips the demux or the speech-to-text. One
transcription per video runs at a time in a process; questions that need it meanwhile follow its
progress. Speech-to-text runs on its own thread, never the model thread, so an hour of audio
does not stall the questions being decoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cache.keys import digest_bytes
from model.subtitles import Cue, SubtitleError, container_subtitles, load_subtitles

from ..engine.events import ProgressEvent
from ..engine.jobs import SubtitleRef
from ..engine.storage import MediaStore
from ..metrics import LlamaVidMetrics
from .features import Emit, JobError, stored_video

log = logging.getLogger(__name__)

Source = Literal["file", "container", "asr"]


@dataclass(frozen=True)
class Subtitles:
    cues: list[Cue]
    source: Source | None  # None: the question has none


NO_SUBTITLES = Subtitles([], None)


class SubtitleSource:
    def __init__(self, media: MediaStore, metrics: LlamaVidMetrics, *, asr_model: str | None = None,
                 asr_device: str = "cpu") -> None:
        self.media = media
        self.metrics = metrics
        self.asr_model = asr_model
        self.asr_device = asr_device
        self._asr_thread = ThreadPoolExecutor(1, thread_name_prefix="llamavid-asr") if asr_model else None
        self._whisper = None
        self._working: dict[str, asyncio.Task[Subtitles]] = {}
        self._progress: dict[str, tuple[float, float]] = {}  # video digest -> (seconds done, total)

    def close(self) -> None:
        if self._asr_thread is not None:
            self._asr_thread.shutdown(wait=False, cancel_futures=True)

    async def for_question(self, ref: SubtitleRef, video_digest: str, video_id: str | None,
                           emit: Emit | None) -> Subtitles:
        if ref.source == "none":
            return NO_SUBTITLES
        if ref.source == "file":
            data = await self.media.get(ref.digest or "")
            if data is None:
                raise JobError(410, "subtitles_gone", "the subtitles sent with this video are no longer stored; "
                                                      "send them again")
            try:
                return Subtitles(await asyncio.to_thread(load_subtitles, data), "file")
            except SubtitleError as exc:  # checked on upload; a store that changed under us
                raise JobError(400, "invalid_subtitles", str(exc)) from exc
        return await self._own(video_digest, video_id, emit)

    # -- the video's own subtitles: its track, else its speech ---------------------------------------
    def _key(self, video_digest: str) -> str:
        asr = Path(self.asr_model).name if self.asr_model else ""
        return digest_bytes(f"subtitles|{video_digest}|{asr}".encode())

    async def _own(self, video_digest: str, video_id: str | None, emit: Emit | None) -> Subtitles:
        key = self._key(video_digest)
        stored = await self.media.get(key)
        if stored is not None:
            return _loads(stored)
        task = self._working.get(key)
        if task is None:
            task = asyncio.ensure_future(self._work_out(key, video_digest))
            self._working[key] = task
            task.add_done_callback(lambda _: self._working.pop(key, None))
        relay = asyncio.ensure_future(self._relay(key, video_id, emit)) if emit and video_id else None
        try:
            return await asyncio.shield(task)
        finally:
            if relay is not None:
                relay.cancel()

    async def _work_out(self, key: str, video_digest: str) -> Subtitles:
        async with stored_video(self.media, video_digest) as path:
            with self.metrics.stage("transcribe"):
                try:
                    cues = await asyncio.to_thread(container_subtitles, path)
                except SubtitleError as exc:  # an unreadable track: say so in the log, carry on without it
                    log.warning("video %s: %s", video_digest[:12], exc)
                    cues = None
                found = Subtitles(cues, "container") if cues else NO_SUBTITLES
                if not cues and self.asr_model:
                    transcript = await self._transcribe(key, path)
                    if transcript is not None:  # None: no soundtrack to transcribe
                        found = Subtitles(transcript, "asr")
        self.metrics.subtitles_worked_out.labels(found.source or "none").inc()
        await self.media.put(key, _dumps(found))
        return found

    async def _transcribe(self, key: str, path: Path) -> list[Cue] | None:
        loop = asyncio.get_running_loop()

        def progress(done: float, total: float) -> None:
            last = self._progress.get(key, (0.0, total))[0]
            self.metrics.audio_seconds_transcribed.inc(max(0.0, done - last))
            self._progress[key] = (done, total)

        def run() -> list[Cue] | None:
            from model.asr import AudioDecodeError, Whisper  # torch and transformers' Whisper: worker only

            if self._whisper is None:
                self._whisper = Whisper.load(self.asr_model, device=self.asr_device)
            try:
                return self._whisper.transcribe(path, progress=progress)
            except AudioDecodeError as exc:
                raise JobError(400, "invalid_audio", str(exc)) from exc

        try:
            return await loop.run_in_executor(self._asr_thread, run)
        finally:
            self._progress.pop(key, None)

    async def _relay(self, key: str, video_id: str, emit: Emit) -> None:
        """Progress of a transcription as progress events (seconds of audio), every second or so."""
        last = None
        while True:
            current = self._progress.get(key)
            if current is not None and current != last:
                last = current
                await emit(ProgressEvent(video_id=video_id, status="transcribing", frames_done=int(current[0]),
                                         frames_total=int(current[1])))
            await asyncio.sleep(1.0)


def _dumps(found: Subtitles) -> bytes:
    return json.dumps({"source": found.source, "cues": [[c.start, c.end, c.text] for c in found.cues]}).encode()


def _loads(data: bytes) -> Subtitles:
    body = json.loads(data)
    return Subtitles([Cue(float(a), float(b), str(t)) for a, b, t in body["cues"]], body["source"])

