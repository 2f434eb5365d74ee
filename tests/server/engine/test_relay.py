"""What the split deployment's relay forwards of each answer when a worker's retry resends it."""

from __future__ import annotations

from server.engine.events import DeltaEvent, ErrorEvent, TokenLogprob
from server.engine.redis.client import _Relayed
from server.worker.consumer import _so_far


def _lp(*tokens: str) -> list[TokenLogprob]:
    return [TokenLogprob(token=t, logprob=-float(i), bytes=list(t.encode())) for i, t in enumerate(tokens)]


def _delta(text: str, offset: int, tokens: tuple[str, ...], token_offset: int, **kw) -> DeltaEvent:
    return DeltaEvent(text=text, offset=offset, logprobs=_lp(*tokens), token_offset=token_offset, **kw)


def test_a_retry_forwards_only_what_the_client_lacks_text_and_logprobs() -> None:
    relayed = _Relayed()
    first = relayed.take(_delta("Hello", 0, ("Hel", "lo"), 0))
    assert first.text == "Hello" and [e.token for e in first.logprobs] == ["Hel", "lo"]
    # the worker died; its replacement starts the answer again and goes one token further
    relayed.replay = ""
    assert relayed.take(_delta("Hel", 0, ("Hel",), 0)) is None
    more = relayed.take(_delta("lo world", 3, ("lo", " world"), 1, finish_reason="stop"))
    assert (more.text, more.offset, more.token_offset) == (" world", 5, 2)
    assert [e.token for e in more.logprobs] == [" world"] and more.finish_reason == "stop"
    assert relayed.take(_delta("", 11, (), 3, finish_reason="stop")) is None  # the end goes out once


def test_a_retry_that_disagrees_is_an_error_not_a_spliced_answer() -> None:
    relayed = _Relayed()
    relayed.take(DeltaEvent(text="Hello"))
    relayed.replay = ""
    error = relayed.take(DeltaEvent(text="Help"))
    assert isinstance(error, ErrorEvent) and error.code == "worker_failed"
    gap = _Relayed().take(DeltaEvent(text="x", offset=4))
    assert isinstance(gap, ErrorEvent) and gap.code == "events_lost"


def test_the_worker_resends_each_answer_whole() -> None:
    """What a worker resends after Redis lost its events: each answer from its start as one delta."""
    so_far = None
    for event in (_delta("Hel", 0, ("Hel",), 0, index=1), _delta("lo", 3, ("lo",), 1, index=1)):
        so_far = _so_far(so_far, event)
    assert (so_far.text, so_far.offset, so_far.index, so_far.token_offset) == ("Hello", 0, 1, 0)
    assert [e.token for e in so_far.logprobs] == ["Hel", "lo"]
    relayed = _Relayed()
    relayed.take(_delta("Hel", 0, ("Hel",), 0, index=1))
    relayed.replay = ""
    forward = relayed.take(so_far)
    assert forward.text == "lo" and [e.token for e in forward.logprobs] == ["lo"]
