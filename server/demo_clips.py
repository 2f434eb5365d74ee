"""Clips for the page's "Try a demo clip" button, made as ``llamavid demo-clip`` makes them.

The composition root (``server.launch``) hands ``make_demo_clip`` to the HTTP app, so that
``server.api`` never imports ``model``: the clip code itself is numpy, PIL and PyAV, but the
``model.demo`` package also knows how to build a random checkpoint, which needs torch.
"""

from __future__ import annotations

import random

# (seed, question type) of the clips the button cycles through. Seeds near 10,000 are disjoint
# from training (seeds from 1,000,000 on) and evaluation (from 2e9); these are ones whose offered
# questions the shipped demo model answers right, so a first-time user sees what it can do. Its
# real accuracy, over 1,167 fresh questions, is the table in the README.
CURATED = ((10_003, "binding"), (10_006, "time"), (10_004, "binding"), (10_001, "time"), (10_011, "binding"),
           (10_007, "time"))

# The question types the demo answers well, in the order the page offers them. "Which way does
# the square move?" is left out: the demo gets it right only 10 times in 30.
OFFERED = ("binding", "counting", "time")
MAX_QUESTIONS = 4


def offered_questions(scene, seed: int) -> list[dict]:
    from model.demo.data import questions

    picked, seen = [], set()
    for qa in questions(scene, random.Random(seed)):
        # one question of each form ("What colour is the circle?", "Which shape is red?", ...) about
        # different shapes, so the few offered show different skills
        form = qa.question.split(" the ")[0].split(" is ")[0]
        about = qa.answer if qa.question.startswith("Which shape") else qa.question.rstrip("?").rsplit(" ", 1)[-1]
        if qa.qtype in OFFERED and not qa.question.startswith("Which way") and form not in seen and about not in seen:
            picked.append(qa)
            seen |= {form, about}
    picked.sort(key=lambda qa: OFFERED.index(qa.qtype))
    return [{"question": qa.question, "answer": qa.answer, "type": qa.qtype} for qa in picked[:MAX_QUESTIONS]]


def make_demo_clip(index: int) -> tuple[bytes, str, list[dict]]:
    """The ``index``-th curated clip (cycling): its MP4 bytes, a file name and the questions to offer."""
    from model.demo.data import encode_clip, make_example, render

    seed, qtype = CURATED[index % len(CURATED)]
    example = make_example(seed, qtype)
    data = encode_clip(render(example.scene))
    return data, f"demo-shapes-{seed}.mp4", offered_questions(example.scene, seed)
