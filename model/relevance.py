"""Which frames a question needs: thinning a video to fit the context, and moments.

The context attention already scores every frame against the question (``FrameTokens.relevance``:
the log-sum-exp of the text queries' attention logits over the frame's patches, averaged over
queries). An hour at 1 fps is 3,600 such numbers; this module turns them into the two things a
user acts on: the frames to give the LLM when not all of them fit, and up to five time spans
that answer "when?".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

FrameSelection = Literal["uniform", "relevant"]


def uniform_subset(total: int, keep: int) -> list[int]:
    """``keep`` indices spread evenly over ``range(total)``, first and last included.

    The official sampler's rule for more frames than wanted (``np.linspace`` rounded), applied to
    frames already sampled, so a thinned hour still covers the whole hour.
    """
    if keep >= total:
        return list(range(total))
    if keep <= 0:
        return []
    if keep == 1:
        return [(total - 1) // 2]
    step = (total - 1) / (keep - 1)  # > 1, so the rounded indices are distinct
    return [round(i * step) for i in range(keep)]


def relevant_subset(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring frames, in time order (the LLM reads a story, not a ranking).

    Ties go to the earlier frame, so the choice is deterministic.
    """
    total = scores.numel()
    if keep >= total:
        return list(range(total))
    order = sorted(range(total), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def select_frames(total: int, keep: int, how: FrameSelection, scores: torch.Tensor | None = None) -> list[int]:
    if how == "relevant":
        if scores is None or scores.numel() != total:
            raise ValueError(f"relevant selection needs one score per frame ({total})")
        return relevant_subset(scores, keep)
    return uniform_subset(total, keep)


def fit_frames(total: int, budget: int, tokens_per_frame: int, prompt_tokens: Callable[[list[int]], int],
               select: Callable[[int], list[int]], *, max_tries: int = 12) -> list[int]:
    """The frames (indices, in time order) of the largest selection whose prompt fits ``budget``.

    ``prompt_tokens(indices)`` is the prompt's exact length with those frames (text, subtitles and
    visual tokens); ``select(keep)`` picks ``keep`` of the ``total`` frames. The text around the
    frames hardly depends on which are kept (every subtitle lands on some frame), so the first
    guess is nearly right; then the count moves by what is left over or over budget, within the
    bounds already known to fit and not to fit. [] when not even one frame fits.
    """
    every = list(range(total))
    if total == 0 or prompt_tokens(every) <= budget:
        return every
    text = prompt_tokens(select(1)) - tokens_per_frame
    fits, fails = 0, total  # the most frames known to fit, the fewest known not to
    best: list[int] = []
    keep = max(1, min(total - 1, (budget - text) // tokens_per_frame))
    for _ in range(max_tries):
        chosen = select(keep)
        spare = budget - prompt_tokens(chosen)
        if spare >= 0:
            fits, best = keep, chosen
            keep = min(fails - 1, keep + spare // tokens_per_frame)
        else:
            fails = keep
            over = -spare
            keep = max(fits + 1, keep - (over + tokens_per_frame - 1) // tokens_per_frame)
        if keep <= fits or keep >= fails:
            break
    return best


@dataclass(frozen=True)
class Moment:
    start: float  # seconds
    end: float  # seconds
    score: float  # share of the question's attention over the whole video inside the span (0..1)
    peak: int  # index (among the sampled frames) of the span's most relevant frame
    frames: tuple[int, int]  # first and last sampled frame of the span


def moments(scores: torch.Tensor, timestamps: list[float], *, limit: int = 5, gap: int = 1,
            frame_seconds: float | None = None) -> list[Moment]:
    """Up to ``limit`` spans of neighbouring relevant frames, most relevant first.

    A frame is relevant when its score stands a standard deviation above the video's mean (the
    scores are logits: their spread, not their level, says what stands out); the best frame
    always is. Relevant frames at most ``gap`` frames apart join one span. A span's score is the
    softmax mass of its frames, so spans of different lengths compare on one scale and the scores
    of all spans sum to at most 1. A span ends where its last frame's sampling interval ends.
    """
    raw = scores.float().flatten()
    total = raw.numel()
    if total == 0:
        return []
    if len(timestamps) != total:
        raise ValueError(f"{total} scores but {len(timestamps)} timestamps")
    weights = torch.softmax(raw, dim=0)
    threshold = raw.mean() + (raw.std() if total > 1 else 0.0)
    relevant = (raw >= threshold).tolist()
    relevant[int(raw.argmax())] = True
    if frame_seconds is None:
        diffs = [b - a for a, b in zip(timestamps, timestamps[1:]) if b > a]
        frame_seconds = sorted(diffs)[len(diffs) // 2] if diffs else 1.0

    spans: list[list[int]] = []
    for i, keep in enumerate(relevant):
        if not keep:
            continue
        if spans and i - spans[-1][1] <= gap + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    found = []
    for first, last in spans:
        mass = float(weights[first : last + 1].sum())
        peak = first + int(raw[first : last + 1].argmax())
        end = timestamps[last + 1] if last + 1 < total else timestamps[last] + frame_seconds
        found.append(Moment(start=round(timestamps[first], 3), end=round(end, 3), score=round(mass, 5),
                            peak=peak, frames=(first, last)))
    found.sort(key=lambda m: (-m.score, m.start))
    return found[:limit]
