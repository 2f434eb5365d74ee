"""One request's generated text: the state every decoder's tokens are pushed through.

Whichever decoder produced a token (a request decoded alone, or one row of the batched decoder),
the text and the finish come from here: incremental detokenization, stop strings, EOS and the
length budget. ``LlamaVid.stream`` (the CLI and the evaluation) and the service's worker both
run this one state, so they cannot disagree about where an answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .detokenize import Decoder, IncrementalDetokenizer
from .generate import GenerationParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TextDelta:
    text: str  # may be empty: partial characters and stop-string prefixes are held back
    token_id: int
    finish_reason: FinishReason | None = None


class Generation:
    def __init__(self, tokenizer: Decoder, params: GenerationParams, eos_id: int) -> None:
        self.params = params
        self.eos_id = eos_id
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._detok = IncrementalDetokenizer(tokenizer, params.stop)

    def push(self, token_id: int) -> TextDelta:
        """Feed the next generated token; the returned delta carries the finish when this one ends it."""
        if self.finish_reason is not None:
            raise RuntimeError("the generation has already finished")
        self.num_tokens += 1
        if token_id == self.eos_id:
            return self._finish(self._detok.finish(), token_id, "stop")
        text = self._detok.add(token_id)
        if self._detok.stopped:
            return self._finish(text, token_id, "stop")
        if self.num_tokens >= self.params.max_new_tokens:
            return self._finish(text + self._detok.finish(), token_id, "length")
        return TextDelta(text, token_id)

    def _finish(self, text: str, token_id: int, reason: FinishReason) -> TextDelta:
        self.finish_reason = reason
        return TextDelta(text, token_id, reason)
