"""Incremental detokenization and stop strings for streamed generation.

SentencePiece cannot decode token by token: a word's leading space depends on its neighbours
and byte-fallback pieces only make a character together. Each step decodes a short window
from ``prefix_offset`` twice (with and without the new tokens) and emits the difference, holding
back text that ends in an incomplete UTF-8 sequence. Text that could be the start of a stop
string is held back too, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the new text that is safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back once generation ends for any reason other than a stop string."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self.prefix_offset :])
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        if len(tail) > len(prefix):
            self.text += tail[len(prefix) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                final = True
                break
        end = len(self.text)
        if not final:
            for stop in self.stop:  # hold back a suffix that could still grow into a stop string
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
