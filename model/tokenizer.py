"""The LLaMA tokenizer as the official code used it: SentencePiece in transformers 4.31 legacy mode.

Encoding splits the text on the special-token strings (``<s>``, ``</s>``, ``<unk>``) first, so a
multi-turn history's ``</s>`` becomes the EOS id, and every remaining segment is encoded on its
own with SentencePiece's dummy prefix. ``<image>`` prompts are tokenized chunk by chunk (LLaVA's
``tokenizer_image_token``): each chunk with a leading BOS, BOS kept once, one ``-200``
placeholder between chunks (spec §5.3). Using SentencePiece directly keeps this exact across
transformers releases, whose fast Llama tokenizer no longer has the legacy behaviour.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .config import CheckpointError
from .conversation import IMAGE_PLACEHOLDER

IMAGE_TOKEN_INDEX = -200


class LlamaTextTokenizer:
    def __init__(self, model_file: Path) -> None:
        if not Path(model_file).is_file():
            raise CheckpointError(f"LLaMA tokenizer not found: {model_file} (expected tokenizer.model)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        specials = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._special_ids = specials
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
        self._skip = {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for segment in self._split.split(text):
            if not segment:
                continue
            special = self._special_ids.get(segment)
            ids.extend([special] if special is not None else self.sp.encode(segment))
        return ids

    def encode_with_images(self, prompt: str) -> list[int]:
        """Chunk-wise tokenization around ``<image>``, one ``IMAGE_TOKEN_INDEX`` per placeholder."""
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
        ids = [self.bos_id]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:])
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        size = self.sp.get_piece_size()  # a random test model may emit ids past the tokenizer's end
        ids = [i for i in ids if i < size and not (skip_special_tokens and i in self._skip)]
        return self.sp.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a text (SentencePiece's ``▁`` as a space, ``<0x0A>`` as its
        byte; special tokens as nothing): what OpenAI's ``logprobs`` report per token."""
        if not 0 <= token_id < self.sp.get_piece_size() or token_id in self._skip:
            return b""
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:-1], 16)])
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._skip
