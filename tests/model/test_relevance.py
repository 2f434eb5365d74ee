"""Thinning a video's frames to fit the context, choosing them by relevance, and moments."""

from __future__ import annotations

import pytest
import torch

from model.relevance import fit_frames, moments, relevant_subset, select_frames, uniform_subset


@pytest.mark.parametrize(("total", "keep"), [(10, 3), (3600, 160), (7, 6), (2, 2), (100, 1), (5, 9)])
def test_uniform_subset_spreads_evenly_over_the_whole_video(total: int, keep: int) -> None:
    chosen = uniform_subset(total, keep)
    assert len(chosen) == min(total, keep) and chosen == sorted(set(chosen))
    assert all(0 <= i < total for i in chosen)
    if 1 < keep < total:
        assert chosen[0] == 0 and chosen[-1] == total - 1
        gaps = [b - a for a, b in zip(chosen, chosen[1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly: the gaps differ by rounding only


def test_relevant_subset_keeps_the_best_in_time_order_and_breaks_ties_early() -> None:
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 4.0, -1.0, 4.0])
    assert relevant_subset(scores, 3) == [1, 3, 4]  # 5.0, then the earlier two of the three 4.0s
    assert relevant_subset(scores, 10) == list(range(7))
    assert select_frames(7, 3, "relevant", scores) == [1, 3, 4]
    assert select_frames(7, 3, "uniform") == [0, 3, 6]
    with pytest.raises(ValueError, match="one score per frame"):
        select_frames(8, 3, "relevant", scores)


def test_fit_frames_keeps_the_most_frames_whose_exact_prompt_fits() -> None:
    """A prompt of 50 text tokens plus 2 per frame, and a tokenizer that merges the text between
    kept frames unevenly (one extra token per 7th frame kept): the first guess overshoots and the
    fit corrects it, never ending above the budget or below what fits."""
    def prompt_tokens(indices: list[int]) -> int:
        return 50 + 2 * len(indices) + len(indices) // 7

    for total, budget in [(3600, 400), (100, 400), (1000, 53), (1000, 52), (10, 69)]:
        chosen = fit_frames(total, budget, 2, prompt_tokens, lambda keep: uniform_subset(total, keep))
        if prompt_tokens([0]) > budget:
            assert chosen == []
            continue
        assert prompt_tokens(chosen) <= budget
        if len(chosen) < total:  # maximal: one more frame would not fit
            assert prompt_tokens(list(range(len(chosen) + 1))) > budget


def test_moments_merge_neighbouring_relevant_frames_into_spans() -> None:
    # one hour at 1 fps; the question matters at 600-629 s and, less, at 2400-2409 s
    scores = torch.zeros(3600)
    scores[600:630] = 6.0
    scores[2400:2410] = 4.0
    scores[1200] = 3.0  # a lone frame: a short moment of its own
    times = [float(t) for t in range(3600)]
    found = moments(scores, times)
    assert [(m.start, m.end) for m in found] == [(600.0, 630.0), (2400.0, 2410.0), (1200.0, 1201.0)]
    assert found[0].score > found[1].score > found[2].score and sum(m.score for m in found) <= 1.0
    assert 600 <= found[0].peak < 630 and found[0].frames == (600, 629)


def test_moments_are_at_most_five_and_a_gap_of_one_frame_joins() -> None:
    scores = torch.zeros(100)
    for start in range(0, 100, 10):  # ten bursts of relevance...
        scores[start] = scores[start + 2] = 5.0 + start / 100  # ...each two frames with a one-frame gap
    found = moments(scores, [t * 2.0 for t in range(100)])  # thinned: a frame every 2 s
    assert len(found) == 5 and all(m.end - m.start == 6.0 for m in found)  # frames t, t+2 -> [2t, 2t+6)
    assert [m.frames[0] for m in found] == [90, 80, 70, 60, 50]  # the most relevant first


def test_flat_relevance_still_names_the_best_frame() -> None:
    found = moments(torch.zeros(4), [0.0, 1.0, 2.0, 3.0])
    assert len(found) >= 1 and found[0].start == 0.0
    assert moments(torch.zeros(0), []) == []
    with pytest.raises(ValueError, match="timestamps"):
        moments(torch.zeros(3), [0.0, 1.0])
