"""Run a parity case (``../shared/parity/<case>``) and compare against the reference's outputs.

Only the case's *inputs* are read from ``expected.safetensors`` (``frames_uint8``); every other
tensor is computed by this implementation from ``checkpoint/`` and ``case.json`` and compared
by relative error ``||ours - ref|| / ||ref||`` in float32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..conversation import Message
from ..generate import GenerationParams, generate_tokens
from ..llama_vid import LlamaVid, VisualInput
from ..loader import load_llamavid

TOLERANCE = 1e-4
INPUT_TENSORS = {"frames_uint8"}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.double()
    if ours.shape != ref.shape:
        return float("inf")
    denom = ref.norm()
    return float((ours - ref).norm() / denom) if denom > 0 else float((ours - ref).norm())


def compute_case(model: LlamaVid, case: dict[str, Any], frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything ``expected.safetensors`` holds, computed by this implementation."""
    captured: dict[str, torch.Tensor] = {}
    num_q = model.config.num_query

    def keep(name, pick):
        def hook(module, args, output) -> None:  # returning None leaves the output untouched
            captured.setdefault(name, pick(output))

        return hook

    hooks = [
        model.qformer.register_forward_hook(keep("qformer_queries", lambda o: o.last_hidden_state[:, :num_q])),
        model.visual.query_projector.register_forward_hook(keep("text_queries", lambda o: o)),
    ]
    question = case["question"]
    try:
        pixels = model.preprocess(frames.numpy())
        features = model.encode_frames(pixels)
        tokens = model.frame_tokens(features, question).tokens
    finally:
        for h in hooks:
            h.remove()
    image_tokens = model.frame_tokens(features[:1], question).tokens
    kind = "video" if features.shape[0] > 1 else "image"
    prepared = model.prepare(
        [Message("user", question)], VisualInput(features, kind), template=case.get("template", "vicuna_v1")
    )
    with torch.inference_mode():
        logits = model.llm(inputs_embeds=prepared.inputs_embeds).logits[0]
    params = GenerationParams(max_new_tokens=int(case.get("max_new_tokens", 12)), temperature=0.0)
    greedy = list(generate_tokens(model.llm, prepared.inputs_embeds, params, eos_id=model.tokenizer.eos_id))
    return {
        "pixel_values": pixels,
        "vision_features": features,
        "qformer_queries": captured["qformer_queries"],
        "text_queries": captured["text_queries"],
        "frame_tokens": tokens[None],
        "image_tokens": image_tokens[None],
        "input_ids": torch.tensor(prepared.input_ids),
        "inputs_embeds": prepared.inputs_embeds[0],
        "logits": logits,
        "greedy_ids": torch.tensor(greedy),
    }


def run_case(case_dir: str | Path) -> dict[str, Any]:
    case_dir = Path(case_dir)
    case = json.loads((case_dir / "case.json").read_text())
    expected = load_file(str(case_dir / "expected.safetensors"))
    model = load_llamavid(case_dir / "checkpoint", device="cpu", dtype=torch.float32)
    ours = compute_case(model, case, expected["frames_uint8"])

    report: dict[str, Any] = {"case": str(case_dir), "tolerance": TOLERANCE, "tensors": {}}
    ok = True
    for name, ref in expected.items():
        if name in INPUT_TENSORS or name in ("greedy_ids", "greedy_min_margin"):
            continue
        if name not in ours:
            report["tensors"][name] = {"error": "not computed"}
            ok = False
            continue
        if name == "input_ids":
            equal = torch.equal(ours[name], ref.long())
            report["tensors"][name] = {"equal": equal}
            ok &= equal
            continue
        err = relative_error(ours[name], ref)
        report["tensors"][name] = {"shape": list(ref.shape), "rel_err": err, "ok": err <= TOLERANCE}
        ok &= err <= TOLERANCE
    greedy_equal = torch.equal(ours["greedy_ids"], expected["greedy_ids"].long())
    report["greedy_ids"] = {"ours": ours["greedy_ids"].tolist(), "reference": expected["greedy_ids"].tolist()}
    report["greedy_ids_equal"] = greedy_equal
    if "greedy_min_margin" in expected:
        report["greedy_min_margin"] = float(expected["greedy_min_margin"])
    report["ok"] = bool(ok and greedy_equal)
    return report
