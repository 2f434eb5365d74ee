"""Write a ``LlamaVid`` to disk in the layout of the released checkpoints.

Used by ``llamavid make-tiny`` (random weights for tests and benchmarks) and by the demo
trainer. The result loads through the same code path as a downloaded checkpoint: bf16 shards
with official key names (including the ignored vision-tower copy the Trainer saved),
``eva_vit_g.pth`` in fp32 LAVIS layout, a CLIP processor folder, the SentencePiece model and the
Q-Former's WordPiece vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ..eva import lavis_state_dict
from ..llama_vid import LlamaVid
from ..weights import official_key

WeightFormat = Literal["bin", "safetensors"]


def official_state(model: LlamaVid, *, include_vision_copy: bool = True) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("qformer.", model.qformer), ("visual.", model.visual), ("llm.", model.llm)):
        for key, tensor in module.state_dict().items():
            state[official_key(prefix + key)] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    n = model.config.qformer.max_position_embeddings
    state["model.vlm_att_encoder.bert.embeddings.position_ids"] = torch.arange(n)[None]
    if include_vision_copy:
        for key, tensor in lavis_state_dict(model.vision).items():
            state["model.vision_tower.vision_tower." + key] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    return state


def save_checkpoint(
    model: LlamaVid,
    out_dir: str | Path,
    *,
    fmt: WeightFormat = "bin",
    num_shards: int = 2,
    tokenizer_model: Path,
    qformer_vocab: Path,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_official_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    defaults = model.generation_defaults
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": defaults.max_length,
           "temperature": defaults.sampling_temperature, "top_p": defaults.top_p}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _write_shards(official_state(model), out, fmt, num_shards)
    torch.save({k: v.detach().float().cpu() for k, v in lavis_state_dict(model.vision).items()}, out / "eva_vit_g.pth")
    _write_processor(model, out / "processor")
    if Path(tokenizer_model).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": model.config.max_token,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )
    qdir = out / "qformer_tokenizer"
    qdir.mkdir(exist_ok=True)
    if Path(qformer_vocab).resolve() != (qdir / "vocab.txt").resolve():
        shutil.copyfile(qformer_vocab, qdir / "vocab.txt")
    (qdir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, indent=2) + "\n"
    )
    return out


def _write_shards(state: dict[str, torch.Tensor], out: Path, fmt: WeightFormat, num_shards: int) -> None:
    keys = list(state)
    num_shards = max(1, min(num_shards, len(keys)))
    total = sum(t.numel() * t.element_size() for t in state.values())
    budget, shards, current, size = total / num_shards, [], [], 0
    for key in keys:  # fill shards in order, like the Trainer's max_shard_size splitting
        current.append(key)
        size += state[key].numel() * state[key].element_size()
        if size >= budget and len(shards) < num_shards - 1:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    if len(shards) == 1:
        names = [f"{stem}.{ext}"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        part = {k: state[k] for k in shard}
        if fmt == "bin":
            torch.save(part, out / name)
        else:
            save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_processor(model: LlamaVid, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    p = model.processor
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": p.crop_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(p.mean), "image_std": list(p.std),
        "resample": p.resample, "size": p.size,
    }, indent=2) + "\n")
    # The official tower reads this CLIPVisionConfig although it never uses it.
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "hidden_size": model.vision.config.hidden_size, "image_size": p.crop_size,
        "patch_size": model.vision.config.patch_size, "num_channels": 3,
    }, indent=2) + "\n")
