"""From cached frame features to LLaMA-VID's two kinds of visual token (spec §4.2).

The **context token** is question-conditioned: the Q-Former's queries, projected to the vision
width, attend over the frame's *projected* patch keys and *raw* patch values (scale
``1/sqrt(C)``); the result is averaged over queries and projected by ``context_projector``
(``vlm_att_val_projector``). The **content token(s)** pool the raw patches (mean, grid or none)
and go through ``content_projector`` (``mm_projector``). Quirks kept for parity: the Q-Former
cross-attends to LayerNorm-ed features *with* CLS, while context attention and pooling use the
un-normalised patches without CLS (only when the token count is odd and the select feature
is ``patch``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import InstructBlipQFormerModel

from .config import CheckpointError, Compression, LlamaVidConfig, grid_stride


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's projector builder: ``linear``, ``identity`` or ``mlp{N}x_gelu``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match:
        raise CheckpointError(f"unknown mm_projector_type {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@dataclass
class FrameTokens:
    tokens: torch.Tensor  # [T * (1 + n), H]: context, content..., context, content...
    tokens_per_frame: int
    relevance: torch.Tensor | None = None  # [T]: log-sum-exp attention logit, averaged over queries


class HeadOutput(NamedTuple):
    tokens: torch.Tensor  # [N, 1 + n, H]: the context token, then the content token(s)
    relevance: torch.Tensor | None  # [N]: log-sum-exp attention logit, averaged over queries
    attention: torch.Tensor | None  # [N, P]: the context attention over patches, averaged over queries


class LlamaVidVisualHead(nn.Module):
    """The ``vlm_att_*`` modules and ``mm_projector`` of the official model."""

    def __init__(self, config: LlamaVidConfig) -> None:
        super().__init__()
        c, h, dq = config.mm_hidden_size, config.hidden_size, config.qformer.hidden_size
        self.compression = config.compression
        self.drop_cls_when_odd = config.select_feature == "patch"
        self.query = nn.Parameter(torch.zeros(1, config.num_query, dq))
        self.qformer_ln = nn.LayerNorm(c)  # eps 1e-5, unlike EVA's 1e-6 and BERT's 1e-12
        self.query_projector = nn.Linear(dq, c)
        self.key_projector = nn.Linear(c, c)
        self.context_projector = nn.Linear(c, h)
        self.content_projector = build_projector(config.projector_type, c, h)

    def patches(self, features: torch.Tensor) -> torch.Tensor:
        """Drop CLS for context attention and pooling: only with an odd token count (spec §8 #1)."""
        if self.drop_cls_when_odd and features.shape[1] % 2 == 1:
            return features[:, 1:]
        return features

    def forward(
        self,
        features: torch.Tensor,
        qformer: InstructBlipQFormerModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        with_relevance: bool = False,
        with_attention: bool = False,
    ) -> HeadOutput:
        """features [N, T_tok, C], question ids [1 or N, L] -> tokens [N, 1 + n, H].

        ``with_attention`` returns the query-averaged attention the context token is made with,
        so training can supervise where it looks (the demo's grounding term) without re-deriving it.
        """
        n = features.shape[0]
        dtype = self.query.dtype
        features = features.to(dtype)
        queries = self.query.expand(n, -1, -1)
        num_q = queries.shape[1]
        ids = input_ids.expand(n, -1)
        mask = torch.cat((attention_mask.new_ones(n, num_q), attention_mask.expand(n, -1)), dim=1)
        hidden = qformer(
            input_ids=ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=self.qformer_ln(features),
            encoder_attention_mask=torch.ones(features.shape[:2], dtype=torch.long, device=features.device),
        ).last_hidden_state[:, :num_q]
        text_q = self.query_projector(hidden)

        vis = self.patches(features)
        keys = self.key_projector(vis)
        logits = (text_q @ keys.transpose(-1, -2)) / math.sqrt(vis.shape[-1])
        weights = logits.softmax(-1)
        context = self.context_projector((weights @ vis).mean(1, keepdim=True))
        content = self.content_projector(pool_patches(vis, self.compression))
        return HeadOutput(
            tokens=torch.cat((context, content), dim=1),
            relevance=torch.logsumexp(logits.float(), dim=-1).mean(-1) if with_relevance else None,
            attention=weights.mean(1) if with_attention else None,
        )


def pool_patches(vis: torch.Tensor, compression: Compression) -> torch.Tensor:
    """[N, P, C] -> [N, n, C] content features before projection."""
    if compression.kind == "none":
        return vis
    if compression.kind == "mean":
        return vis.mean(dim=1, keepdim=True)
    side = int(math.sqrt(vis.shape[1]))
    stride = grid_stride(side, compression.grid)
    grid = vis.reshape(vis.shape[0], side, side, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)
    return pooled.flatten(2).transpose(1, 2)
