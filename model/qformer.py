"""The text-conditioned Q-Former: transformers' ``InstructBlipQFormerModel`` plus its BERT tokenizer.

LLaMA-VID's Q-Former is LAVIS' BLIP-2 BERT, which transformers ships as the InstructBLIP
Q-Former (same split FFN for query and text positions, same cross-attention every second
layer); only key names differ (``CHECKPOINT_RENAMES``). The tokenizer is bert-base-uncased
with ``[DEC]`` added as BOS (vocabulary 30523) and *left* truncation at 256 tokens, so a long
question keeps its end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertTokenizer, InstructBlipQFormerModel

from .config import CheckpointError, QFormerDims

QFORMER_MAX_TEXT = 256
DEFAULT_QFORMER_TOKENIZER = "bert-base-uncased"


def build_qformer(dims: QFormerDims, encoder_hidden_size: int) -> InstructBlipQFormerModel:
    config = dims.to_hf(encoder_hidden_size)
    config._attn_implementation = "sdpa"
    return InstructBlipQFormerModel(config).eval()


@dataclass
class QFormerText:
    input_ids: torch.Tensor  # [P, L]
    attention_mask: torch.Tensor  # [P, L]


class QFormerTokenizer:
    """Tokenizes the user's question for the Q-Former exactly as the official code did."""

    def __init__(self, source: str | os.PathLike) -> None:
        try:
            tok = BertTokenizer.from_pretrained(str(source), truncation_side="left", do_lower_case=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"could not load the Q-Former tokenizer from {source!r}: put bert-base-uncased's vocab.txt "
                "in <checkpoint>/qformer_tokenizer/ or pass --qformer-tokenizer PATH_OR_HUB_ID"
            ) from exc
        tok.add_special_tokens({"bos_token": "[DEC]"})
        self._tok = tok

    @staticmethod
    def locate(model_dir: Path, override: str | os.PathLike | None) -> str:
        if override:
            return str(override)
        local = model_dir / "qformer_tokenizer"
        return str(local) if (local / "vocab.txt").is_file() else DEFAULT_QFORMER_TOKENIZER

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, prompts: list[str]) -> QFormerText:
        enc = self._tok(prompts, padding="longest", truncation=True, max_length=QFORMER_MAX_TEXT, return_tensors="pt")
        return QFormerText(enc["input_ids"], enc["attention_mask"])
