"""A tiny random-weight Whisper in the official folder layout, made offline for the ASR tests.

What ``WhisperForConditionalGeneration.generate`` needs from a checkpoint, besides weights:

* a tokenizer whose ids put ordinary tokens first, then ``<|endoftext|>``, the special tokens
  (``<|startoftranscript|>``, languages, ``<|translate|>``, ``<|transcribe|>``, ``<|startoflm|>``,
  ``<|startofprev|>``, ``<|nospeech|>``, ``<|notimestamps|>``) and last the 1501 timestamp tokens
  ``<|0.00|>`` ... ``<|30.00|>``: generation treats every id above ``<|notimestamps|>`` as a
  timestamp and the timestamp rules forbid "text" ids below ``<|endoftext|>``;
* ``generation_config.json`` with ``no_timestamps_token_id`` (timestamps, long-form),
  ``lang_to_id`` / ``task_to_id`` / ``is_multilingual`` (language detection, the task token),
  ``decoder_start_token_id`` and ``max_initial_timestamp_index``;
* ``max_source_positions`` = 1500 (30 s of 10 ms mel frames after the stride-2 convolution).

The tokenizer is written the way OpenAI's folders were: a byte-level BPE ``vocab.json`` (GPT-2's
256 byte symbols and a few merges), ``merges.txt``, ``added_tokens.json`` and the tokenizer
config, and loaded back through ``WhisperProcessor.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

LANGUAGES = ("<|en|>", "<|fr|>")
SPECIALS = ("<|startoftranscript|>", *LANGUAGES, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
TIMESTAMPS = tuple(f"<|{i * 0.02:.2f}|>" for i in range(1501))
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"))
EOT = "<|endoftext|>"


def make_tiny_whisper(out: Path, *, seed: int = 0, max_target_positions: int = 64) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}  # GPT-2 order: "Ġ" is 220
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab[EOT] = eot = len(vocab)
    ids = {token: eot + 1 + i for i, token in enumerate(SPECIALS + TIMESTAMPS)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    (out / "added_tokens.json").write_text(json.dumps(ids, ensure_ascii=False))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT,
               "additional_special_tokens": list(SPECIALS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "add_prefix_space": False}))
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16_000).save_pretrained(out)  # preprocessor_config.json

    vocab_size = eot + 1 + len(SPECIALS) + len(TIMESTAMPS)
    sot, suppress_at_start = ids["<|startoftranscript|>"], [vocab["Ġ"], eot]
    config = WhisperConfig(
        vocab_size=vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=1500,
        max_target_positions=max_target_positions, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, begin_suppress_tokens=suppress_at_start, suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        lang_to_id={lang: ids[lang] for lang in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True, max_initial_timestamp_index=50, begin_suppress_tokens=suppress_at_start,
        suppress_tokens=[], max_length=max_target_positions, return_timestamps=False,
    )
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    return out
