"""``llamavid batch INPUT.jsonl OUTPUT.jsonl``: a Batch API input file answered without a server.

The engine is ``llamavid serve``'s (``LocalEngine``: the model, its feature cache and media store
in this process) and the lines run through the server's own ``LineRunner``, grouped by video, so
a line gets the answer the server would give. Besides URLs and data: URLs, a ``video_url`` or
``image_url`` may name a local file (a path, relative to the input file's folder, or a
``file://`` URL): it is read from disk, a video registered once for all its lines.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

from .api.batch import BatchLine, LineRunner, jsonl, parse_jsonl, parse_requests
from .api.errors import APIError
from .api.ingest import VIDEO_ID, MediaIngest
from .api.protocol import ChatCompletionRequest, ImagePart, VideoPart
from .metrics import LlamaVidMetrics
from .settings import Settings

ENDPOINT = "/v1/chat/completions"


def errors_path_for(output: Path) -> Path:
    """``answers.jsonl`` -> ``answers.errors.jsonl``, beside it."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


class LocalFiles:
    """Turns local paths in a request's media parts into what the API takes: a registered video's id
    (each file registered once, when its first line runs), an image's data: URL."""

    def __init__(self, ingest: MediaIngest, folder: Path) -> None:
        self.ingest, self.folder = ingest, folder
        self._videos: dict[Path, asyncio.Future[str]] = {}

    def _path(self, url: str) -> Path | None:
        if url.startswith("file://"):
            url = url[len("file://"):]
        elif "://" in url or url.startswith("data:") or VIDEO_ID.match(url):
            return None
        path = Path(url).expanduser()
        return path if path.is_absolute() else self.folder / path

    async def _video(self, path: Path) -> str:
        if path not in self._videos:
            self._videos[path] = asyncio.ensure_future(self._register(path))
        try:
            return await asyncio.shield(self._videos[path])
        except Exception:
            self._videos.pop(path, None)  # a full queue, say: the next line tries again
            raise

    async def _register(self, path: Path) -> str:
        record = await self.ingest.video(await asyncio.to_thread(self._read, path), self.ingest.sampling(None),
                                         path.name)
        return record.id

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise APIError(400, f"cannot read {path}: {exc.strerror or exc}", code="file_not_found") from None

    async def prepare(self, line: BatchLine) -> ChatCompletionRequest:
        request = line.request.model_copy(deep=True)
        for message in request.messages:
            for part in message.content if isinstance(message.content, list) else ():
                if isinstance(part, VideoPart) and (path := self._path(part.video_url.url)) is not None:
                    part.video_url.url = await self._video(path)
                elif isinstance(part, ImagePart) and (path := self._path(part.image_url.url)) is not None:
                    data = await asyncio.to_thread(self._read, path)
                    part.image_url.url = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
        return request


async def run_batch(settings: Settings, source: Path, output: Path, errors: Path) -> int:
    try:
        objects = parse_jsonl(source.read_bytes(), settings.max_batch_lines)
    except (OSError, APIError) as exc:
        print(f"llamavid batch: {source}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    lines, invalid = parse_requests(objects, ENDPOINT)
    if invalid:
        for error in invalid[:20]:
            print(f"llamavid batch: {source}: {error.message}", file=sys.stderr)
        if len(invalid) > 20:
            print(f"llamavid batch: ... and {len(invalid) - 20} more", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .worker.local import local_engine_factory  # torch and the model: only for a file that can run

    metrics = LlamaVidMetrics()
    engine = await local_engine_factory(settings, metrics)
    ingest = MediaIngest(settings, engine, metrics)
    results: dict[int, tuple[bool, dict]] = {}
    bar = tqdm(total=len(lines), unit="line", desc="batch", file=sys.stderr)

    async def on_result(line: BatchLine, ok: bool, row: dict) -> None:
        results[line.index] = (ok, row)
        bar.update(1)
        failed = sum(1 for good, _ in results.values() if not good)
        if failed:
            bar.set_postfix(failed=failed)

    runner = LineRunner(engine, ingest, settings, base_url=f"http://{settings.host}:{settings.port}/",
                        prepare=LocalFiles(ingest, source.resolve().parent).prepare)
    try:
        await runner.run(lines, on_result, asyncio.Event())
    finally:
        bar.close()
        await engine.close()
        answered = [row for _, (ok, row) in sorted(results.items()) if ok]
        failed = [row for _, (ok, row) in sorted(results.items()) if not ok]
        output.write_bytes(jsonl(answered))
        if failed:
            errors.write_bytes(jsonl(failed))
        print(f"llamavid batch: {len(answered)} of {len(lines)} answered into {output}"
              + (f", {len(failed)} failed (see {errors})" if failed else ""), file=sys.stderr)
    return 0
