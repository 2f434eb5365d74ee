"""Context and content tokens: grid pooling, tokens per frame, and the odd-count CLS rule (spec §4.2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.config import Compression
from model.frame_tokens import pool_patches
from model.loader import load_llamavid
from tests.model.checkpoints import clone, edit_config


def hand_grid_pool(vis: torch.Tensor, g: int) -> torch.Tensor:
    """Average over stride x stride blocks, blocks in row-major order; remainder rows/cols dropped."""
    n, p, c = vis.shape
    side = math.isqrt(p)
    stride = side // g
    m = side // stride
    out = torch.empty(n, m * m, c, dtype=vis.dtype)
    for i in range(m):
        for j in range(m):
            rows = range(i * stride, (i + 1) * stride)
            cols = range(j * stride, (j + 1) * stride)
            idx = [r * side + col for r in rows for col in cols]
            out[:, i * m + j] = vis[:, idx].mean(1)
    return out


@pytest.mark.parametrize(("side", "g", "m"), [(4, 2, 2), (16, 4, 4), (8, 3, 4), (7, 2, 2), (16, 6, 8), (5, 5, 5)])
def test_grid_pooling_order(side: int, g: int, m: int) -> None:
    vis = torch.randn(3, side * side, 5, dtype=torch.float64)
    pooled = pool_patches(vis, Compression("grid", g))
    assert pooled.shape == (3, m * m, 5)
    torch.testing.assert_close(pooled, hand_grid_pool(vis, g), rtol=1e-12, atol=1e-12)
    assert Compression("grid", g).num_tokens(side * side) == m * m


def test_grid_pooling_is_row_major() -> None:
    # Patch value = its row index * 10 + column index: block (i, j) averages to a known number.
    side, g = 4, 2
    vis = torch.tensor([[r * 10.0 + c] for r in range(side) for c in range(side)])[None]
    pooled = pool_patches(vis, Compression("grid", g))[0, :, 0]
    assert pooled.tolist() == [5.5, 7.5, 25.5, 27.5]  # (0,0) (0,1) (1,0) (1,1)


def test_mean_and_none_pooling() -> None:
    vis = torch.randn(2, 9, 4, dtype=torch.float64)
    torch.testing.assert_close(pool_patches(vis, Compression("mean")), vis.mean(1, keepdim=True))
    assert pool_patches(vis, Compression("none")) is vis


@pytest.mark.parametrize(("compress", "per_frame"), [("mean", 2), ("mean_concat", 2), ("grid:2", 5), ("grid:4", 17),
                                                     (None, 17)])
def test_tokens_per_frame(compress, per_frame: int, tiny_checkpoint: Path, tiny_frames, tmp_path: Path) -> None:
    """56 px tiny model: 16 patches + CLS. mean -> 1+1, grid:2 -> 1+4, grid:4 -> 1+16, none -> 1+P."""
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(ckpt, compress_type=compress)
    model = load_llamavid(ckpt)
    assert model.tokens_per_frame() == per_frame
    features = model.encode_frames(model.preprocess(tiny_frames))
    frame = model.frame_tokens(features, "what is the man doing?")
    assert frame.tokens_per_frame == per_frame
    assert frame.tokens.shape == (len(tiny_frames) * per_frame, model.config.hidden_size)


def _capture_qformer_input(model):
    seen: list[torch.Size] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].shape)

    return seen, model.qformer.register_forward_pre_hook(hook, with_kwargs=True)


def _hand_tokens(model, features: torch.Tensor, patches: torch.Tensor, question: str) -> torch.Tensor:
    """Spec §4.2 written out: Q-Former on LN(features), attention over ``patches``, mean pooling."""
    v = model.visual
    text = model.qformer_tokenizer([question])
    n, q = features.shape[0], v.query.shape[1]
    with torch.inference_mode():
        hidden = model.qformer(
            input_ids=text.input_ids.expand(n, -1),
            attention_mask=torch.cat((torch.ones(n, q, dtype=torch.long), text.attention_mask.expand(n, -1)), 1),
            query_embeds=v.query.expand(n, -1, -1),
            encoder_hidden_states=v.qformer_ln(features),
        ).last_hidden_state[:, :q]
        text_q = v.query_projector(hidden)  # [N, Q, C]
        keys = v.key_projector(patches)
        weights = torch.softmax(text_q @ keys.transpose(1, 2) / math.sqrt(patches.shape[-1]), dim=-1)
        context = v.context_projector((weights @ patches).mean(1))  # values: raw patches
        content = v.content_projector(patches.mean(1))
    return torch.stack((context, content), 1)  # [N, 2, H]


def test_odd_count_drops_cls_but_qformer_sees_it(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))
    assert features.shape[1] == 17  # 16 patches + CLS: odd
    seen, handle = _capture_qformer_input(tiny_model)
    try:
        tokens = tiny_model.frame_tokens(features, "what is the man doing?").tokens
    finally:
        handle.remove()
    assert seen == [torch.Size((3, 17, tiny_model.config.mm_hidden_size))]
    expected = _hand_tokens(tiny_model, features, features[:, 1:], "what is the man doing?")
    torch.testing.assert_close(tokens.view(3, 2, -1), expected, rtol=1e-5, atol=1e-6)
    # And it matters: keeping CLS in the pooled patches gives different tokens.
    with_cls = _hand_tokens(tiny_model, features, features, "what is the man doing?")
    assert not torch.allclose(with_cls, expected, rtol=1e-3, atol=1e-4)


def test_even_count_keeps_every_token(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))[:, 1:]  # 16 tokens: even
    seen, handle = _capture_qformer_input(tiny_model)
    try:
        tokens = tiny_model.frame_tokens(features, "what is the man doing?").tokens
    finally:
        handle.remove()
    assert seen == [torch.Size((3, 16, tiny_model.config.mm_hidden_size))]
    expected = _hand_tokens(tiny_model, features, features, "what is the man doing?")
    torch.testing.assert_close(tokens.view(3, 2, -1), expected, rtol=1e-5, atol=1e-6)


def test_select_feature_cls_patch_keeps_cls(tiny_checkpoint: Path, tiny_frames, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(ckpt, mm_vision_select_feature="cls_patch", compress_type=None)
    model = load_llamavid(ckpt)
    features = model.encode_frames(model.preprocess(tiny_frames[:1]))
    frame = model.frame_tokens(features, "what?")
    assert frame.tokens_per_frame == 1 + 17  # CLS kept among the content tokens
    content = model.visual.content_projector(features)
    torch.testing.assert_close(frame.tokens[1:], content[0], rtol=1e-5, atol=1e-6)


def test_frame_blocks_do_not_change_the_tokens(tiny_model, tiny_frames) -> None:
    """Long videos run the Q-Former in blocks of frames; the result must not depend on the block size."""
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))
    whole = tiny_model.frame_tokens(features, "where is the dog?").tokens
    blocked = tiny_model.frame_tokens(features, "where is the dog?", block_size=1).tokens
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    # Frames are independent and ordered: frame t's tokens are rows 2t, 2t+1.
    single = tiny_model.frame_tokens(features[2:3], "where is the dog?").tokens
    torch.testing.assert_close(whole[4:6], single, rtol=1e-5, atol=1e-6)


def test_context_token_depends_on_the_question(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames[:1]))
    a = tiny_model.frame_tokens(features, "what colour is the car?").tokens
    b = tiny_model.frame_tokens(features, "how many people are there?").tokens
    assert not torch.allclose(a[0], b[0])  # context token: question-conditioned
    torch.testing.assert_close(a[1], b[1])  # content token: not


def test_relevance_scores(tiny_model, tiny_frames) -> None:
    features = tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))
    frame = tiny_model.frame_tokens(features, "what?", with_relevance=True)
    assert frame.relevance is not None and frame.relevance.shape == (3,)
    assert tiny_model.frame_tokens(features, "what?").relevance is None


def test_returned_attention_is_what_the_context_token_is_made_of(tiny_model, tiny_frames) -> None:
    """``with_attention``: the query-averaged weights over patches; the context token projects their mix."""
    model = tiny_model
    features = model.encode_frames(model.preprocess(tiny_frames))
    text = model.qformer_tokenizer(["where is the dog?"])
    out = model.visual(features, model.qformer, text.input_ids, text.attention_mask, with_attention=True)
    patches = model.visual.patches(features)
    assert out.attention.shape == patches.shape[:2]
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(len(features)))
    torch.testing.assert_close(out.tokens[:, 0], model.visual.context_projector(torch.bmm(out.attention[:, None], patches)[:, 0]),
                               rtol=1e-5, atol=1e-6)
    plain = model.visual(features, model.qformer, text.input_ids, text.attention_mask)
    assert plain.attention is None and plain.relevance is None
    torch.testing.assert_close(plain.tokens, out.tokens)
