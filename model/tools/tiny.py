"""Random-weight LLaMA-VID checkpoints in the official layout, at any size.

For tests, benchmarks and the zero-setup demo: nothing can be downloaded here, so the project
makes its own checkpoints, tokenizers included (a SentencePiece BPE model with LLaMA's
conventions and an uncased WordPiece vocabulary), and loads them through the real loader.
``7b`` has the real shapes (Vicuna-7B, EVA-G, bert-base Q-Former) for GPU checks.
"""

from __future__ import annotations

import io
import math
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn
from transformers import LlamaForCausalLM

from ..config import Compression, LlamaVidConfig, QFormerDims
from ..conversation import TEMPLATES
from ..eva import eva_from_lavis
from ..frame_tokens import LlamaVidVisualHead
from ..generate import GenerationDefaults
from ..llama_vid import LlamaVid
from ..preprocess import ClipPreprocessor
from ..qformer import QFormerTokenizer, build_qformer
from ..tokenizer import LlamaTextTokenizer
from .export import WeightFormat, save_checkpoint


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 172
    vocab: int = 400
    eva_width: int = 176
    eva_depth: int = 2
    eva_mlp: int = 768
    image_size: int = 56
    qformer: QFormerDims = field(default_factory=lambda: QFormerDims(64, 2, 4, 128, 0))
    num_query: int = 8
    compress: str | None = "mean"
    projector: str = "mlp2x_gelu"
    max_token: int = 2048
    rope_scaling: float | None = None


PRESETS: dict[str, TinySpec] = {
    "tiny": TinySpec(),
    "small": TinySpec(
        hidden=256, layers=4, heads=4, intermediate=688, vocab=1000, eva_width=352, eva_depth=4, eva_mlp=1536,
        image_size=112, qformer=QFormerDims(128, 2, 4, 256, 0), num_query=16,
    ),
    "7b": TinySpec(
        hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000, eva_width=1408, eva_depth=39,
        eva_mlp=6144, image_size=224, qformer=QFormerDims(), num_query=32, max_token=2048,
    ),
}

_WORDS = (
    "the a an is are was were what which who where when why how many much does do did there this that these "
    "those it its in on at of to from with and or not no yes video image frame frames scene man woman person "
    "people dog cat car ball circle square triangle red green blue yellow purple orange white black left right "
    "up down moves moving appears disappears beginning end first last start happens doing kitchen room outside "
    "describe detail shown colour color shape count one two three four five kind type large small big little "
    "cooking running walking playing holding talking sitting standing jumping eating watching picture movie "
    "answer question user assistant chat between curious artificial intelligence gives helpful detailed polite "
    "answers questions human memorize content watching below now"
).split()


def training_corpus(seed: int = 0, sentences: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = [t.system for t in TEMPLATES.values()]
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def train_sentencepiece(lines: list[str], vocab: int, out: Path) -> Path:
    """A BPE model with LLaMA's conventions: unk/bos/eos = 0/1/2, byte fallback, dummy prefix."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        split_digits=True, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    out.write_bytes(buf.getvalue())
    return out


def write_wordpiece_vocab(lines: list[str], out: Path, *, size: int | None = None) -> Path:
    """An uncased WordPiece vocabulary: specials, characters, ``##`` characters, then whole words."""
    chars = sorted({c for line in lines for c in line.lower() if not c.isspace()})
    words = sorted({w.strip(".,?!").lower() for line in lines for w in line.split()} - set(chars) - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars if c.isalnum()), *words]
    if size is not None:
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    out.write_text("\n".join(vocab) + "\n")
    return out


def build_random_llamavid(
    spec: TinySpec, tokenizer_model: Path, qformer_vocab: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlamaVid:
    torch.manual_seed(seed)
    tokenizer = LlamaTextTokenizer(tokenizer_model)
    qtok = QFormerTokenizer(qformer_vocab.parent)
    vocab = spec.vocab if spec.vocab >= tokenizer.vocab_size else tokenizer.vocab_size
    qdims = replace(spec.qformer, vocab_size=len(qtok))
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if spec.rope_scaling:
        rope = {"rope_type": "linear", "factor": spec.rope_scaling, "rope_theta": 10000.0}
    llama = {
        "vocab_size": vocab, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.heads,
        "hidden_act": "silu", "max_position_embeddings": max(512, spec.max_token // 4), "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "attention_bias": False, "rope_parameters": rope,
    }
    config = LlamaVidConfig(
        model_dir=Path("."), llama=llama, mm_hidden_size=spec.eva_width, projector_type=spec.projector,
        num_query=spec.num_query, compression=Compression.parse(spec.compress), bert_type="qformer_pretrain_freeze",
        qformer=qdims, image_aspect_ratio="pad", max_token=spec.max_token,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        vision = eva_from_lavis(random_lavis_state(spec), spec.image_size, dtype=dtype)
        qformer = build_qformer(qdims, spec.eva_width)
        visual = LlamaVidVisualHead(config)
        _init_linear(visual)
        nn.init.normal_(visual.query, std=0.02)
        llm = LlamaForCausalLM(config.llama_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    processor = ClipPreprocessor(size=spec.image_size, crop_size=spec.image_size)
    return LlamaVid(
        config, vision.eval(), qformer.eval(), visual.eval(), llm, tokenizer, qtok, processor,
        GenerationDefaults(), "random",
    )


def make_tiny(
    out_dir: str | Path,
    preset: str | TinySpec = "tiny",
    *,
    fmt: WeightFormat = "bin",
    num_shards: int = 2,
    seed: int = 0,
    compress: str | None | object = ...,
    image_size: int | None = None,
) -> Path:
    """Write a random checkpoint; ``compress`` / ``image_size`` override the preset."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    if compress is not ...:
        spec = replace(spec, compress=compress)  # type: ignore[arg-type]
    if image_size is not None:
        spec = replace(spec, image_size=image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = training_corpus(seed)
    with tempfile.TemporaryDirectory() as tmp:
        sp_file = train_sentencepiece(lines, min(spec.vocab, 1000), Path(tmp) / "tokenizer.model")
        qdir = Path(tmp) / "qformer_tokenizer"
        qdir.mkdir()
        vocab_file = write_wordpiece_vocab(lines, qdir / "vocab.txt", size=30522 if spec.qformer.vocab_size == 30523 else None)
        dtype = torch.bfloat16 if spec.hidden >= 2048 else torch.float32
        model = build_random_llamavid(spec, sp_file, vocab_file, seed=seed, dtype=dtype)
        save_checkpoint(model, out, fmt=fmt, num_shards=num_shards, tokenizer_model=sp_file, qformer_vocab=vocab_file)
    return out


def _init_linear(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def random_lavis_state(spec: TinySpec, patch: int = 14) -> dict[str, torch.Tensor]:
    """A random EVA in LAVIS layout, drawn exactly as the hand-written LAVIS module once drew it.

    That module's constructor ran PyTorch's default init (the patch conv, then each block's
    Linears), then ``_init_linear`` and the tower's own init drew normals over most of it; every
    draw moved the generator. Replaying the same draws in the same order keeps a seed's weights, for
    the tower and for everything built after it: the shipped demo checkpoint's training starts
    from them.
    """
    width, grid = spec.eva_width, spec.image_size // patch
    linears = {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
               "mlp.fc1": (spec.eva_mlp, width), "mlp.fc2": (width, spec.eva_mlp)}  # (out, in), module order
    conv = nn.init.kaiming_uniform_(torch.empty(width, 3, patch, patch), a=math.sqrt(5))
    conv_bias = _default_bias(width, 3 * patch * patch)
    for _ in range(spec.eva_depth):
        for name, (out, fan_in) in linears.items():
            nn.init.kaiming_uniform_(torch.empty(out, fan_in), a=math.sqrt(5))
            if name != "attn.qkv":  # LAVIS' qkv has no bias of its own
                _default_bias(out, fan_in)
    blocks = []
    for _ in range(spec.eva_depth):
        block = {f"norm{n}.{p}": torch.full((width,), float(p == "weight")) for n in (1, 2) for p in ("weight", "bias")}
        for name, (out, fan_in) in linears.items():
            block[f"{name}.weight"] = nn.init.normal_(torch.empty(out, fan_in), std=0.02)
            if name != "attn.qkv":
                block[f"{name}.bias"] = torch.zeros(out)
        blocks.append(block)
    state = {
        "cls_token": nn.init.normal_(torch.empty(1, 1, width), std=0.02),
        "pos_embed": nn.init.normal_(torch.empty(1, 1 + grid * grid, width), std=0.02),
        "patch_embed.proj.weight": nn.init.normal_(conv, std=0.02),
        "patch_embed.proj.bias": conv_bias,
    }
    for i, block in enumerate(blocks):
        block["attn.q_bias"] = nn.init.normal_(torch.empty(width), std=0.02)
        block["attn.v_bias"] = nn.init.normal_(torch.empty(width), std=0.02)
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return state


def _default_bias(size: int, fan_in: int) -> torch.Tensor:
    """A bias as ``nn.Linear`` / ``nn.Conv2d`` initialise it."""
    bound = 1 / math.sqrt(fan_in)
    return nn.init.uniform_(torch.empty(size), -bound, bound)
