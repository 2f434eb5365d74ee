"""Synthetic video QA for the demo model: coloured shapes that move, appear and disappear.

Everything is seeded: ``make_example(seed, qtype)`` always returns the same scene and question.
A ``Scene`` is a small description (shapes with a kind, colour, size, trajectory and visible
frame range); ``render`` draws it with PIL and ``write_clip`` encodes it as a real H.264 file
(PyAV, yuv420p), the kind of file the service decodes with decord.

The question types probe what the paper claims the two tokens carry:

* ``binding``: two or three shapes of different kinds and colours in the same frames, "What
  colour is the circle?" / "Which shape is red?". A mean over the frame's patches mixes the
  colours; only a token that looks where the question points can answer.
* ``time``: "What appears at the end?", "What disappears?", "Which way does the square move?".
* ``counting``: "How many shapes are there?".
* ``presence``: "Is there a triangle?", "Is there a red shape?".

Answers are single words, but for one form of question, a binding question that asks for its
answer "in JSON" (``json_questions``): ``{"colour": "red", "shape": "circle"}``, the shape it
is about, as the keys and order of ``JSON_SCHEMA`` (the demo of structured output).
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 225, 40),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
}
KINDS = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("binding", "time", "counting", "presence")
BACKGROUND = (24, 24, 32)
FRAME_SIZES = (64, 80, 96, 112)
MIN_FRAMES, MAX_FRAMES = 8, 16
CLIP_FPS = 1.0  # one frame a second: the service's default sampling (fps=1) reads every frame


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    radius: float  # half the extent, as a fraction of the frame side
    start: tuple[float, float]  # centre at the first frame, fractions of the frame
    shift: tuple[float, float]  # total displacement over the clip, fractions of the frame
    visible: tuple[int, int]  # frames [first, last) on screen

    def centre(self, t: int, num_frames: int) -> tuple[float, float]:
        a = t / max(1, num_frames - 1)
        return self.start[0] + a * self.shift[0], self.start[1] + a * self.shift[1]

    @property
    def direction(self) -> str | None:
        for name, (dx, dy) in DIRECTIONS.items():
            if (dx and np.sign(self.shift[0]) == dx) or (dy and np.sign(self.shift[1]) == dy):
                return name
        return None


@dataclass(frozen=True)
class Scene:
    kind: str  # "static" | "moving" | "appear" | "disappear"
    num_frames: int
    size: int  # frame side in pixels
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


JSON_INSTRUCTION = " Answer in JSON."
JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": list(COLOURS)}, "shape": {"type": "string", "enum": list(KINDS)}},
    "required": ["colour", "shape"],
}


# -- scenes ------------------------------------------------------------------------------------
def make_scene(rng: random.Random, kind: str, num_shapes: int) -> Scene:
    """Shapes of distinct kinds and colours that never overlap while both are on screen."""
    num_frames = rng.randint(MIN_FRAMES, MAX_FRAMES)
    size = rng.choice(FRAME_SIZES)
    for _ in range(1000):
        kinds = rng.sample(KINDS, num_shapes)
        colours = rng.sample(list(COLOURS), num_shapes)
        moving = _pick_movers(rng, kind, num_shapes)
        events = _pick_event(rng, kind, num_shapes, num_frames)
        shapes = tuple(
            _place(rng, k, c, moving[i], events.get(i, (0, num_frames))) for i, (k, c) in enumerate(zip(kinds, colours))
        )
        if not _overlaps(shapes, num_frames, size):
            return Scene(kind, num_frames, size, shapes)
    raise RuntimeError("could not place the shapes")  # pragma: no cover - never with these sizes


def _pick_movers(rng: random.Random, kind: str, n: int) -> list[str | None]:
    if kind != "moving":
        return [None] * n
    movers = [rng.choice(list(DIRECTIONS)) if rng.random() < 0.6 else None for _ in range(n)]
    if not any(movers):
        movers[rng.randrange(n)] = rng.choice(list(DIRECTIONS))
    return movers


def _pick_event(rng: random.Random, kind: str, n: int, num_frames: int) -> dict[int, tuple[int, int]]:
    """Which shape appears (from a frame past half way) or disappears (before the end)."""
    if kind == "appear":
        return {n - 1: (round(num_frames * rng.uniform(0.5, 0.75)), num_frames)}
    if kind == "disappear":
        return {n - 1: (0, round(num_frames * rng.uniform(0.3, 0.6)))}
    return {}


def _place(rng: random.Random, kind: str, colour: str, direction: str | None, visible: tuple[int, int]) -> Shape:
    radius = rng.uniform(0.12, 0.17)
    lo, hi = radius + 0.02, 1 - radius - 0.02
    if direction is None:
        start, shift = (rng.uniform(lo, hi), rng.uniform(lo, hi)), (0.0, 0.0)
    else:
        dx, dy = DIRECTIONS[direction]
        dist = rng.uniform(0.3, hi - lo)
        along = (lo, hi - dist) if (dx + dy) > 0 else (lo + dist, hi)
        a, b = rng.uniform(*along), rng.uniform(lo, hi)
        start = (a, b) if dx else (b, a)
        shift = (dx * dist, dy * dist)
    return Shape(kind, colour, radius, start, shift, visible)


def _overlaps(shapes: tuple[Shape, ...], num_frames: int, size: int) -> bool:
    margin = 3 / size
    for t in range(num_frames):
        on = [s for s in shapes if s.visible[0] <= t < s.visible[1]]
        for i, a in enumerate(on):
            for b in on[i + 1 :]:
                (ax, ay), (bx, by) = a.centre(t, num_frames), b.centre(t, num_frames)
                gap = a.radius + b.radius + margin
                if abs(ax - bx) < gap and abs(ay - by) < gap:
                    return True
    return False


# -- pixels ------------------------------------------------------------------------------------
def render(scene: Scene) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3]."""
    frames = np.empty((scene.num_frames, scene.size, scene.size, 3), dtype=np.uint8)
    for t in range(scene.num_frames):
        image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in scene.shapes:
            if shape.visible[0] <= t < shape.visible[1]:
                _draw(draw, shape, t, scene)
        frames[t] = np.asarray(image)
    return frames


def render_labels(scene: Scene) -> np.ndarray:
    """uint8 label maps [T, H, W]: 0 for the background, i + 1 where shape i is drawn."""
    labels = np.zeros((scene.num_frames, scene.size, scene.size), dtype=np.uint8)
    for t in range(scene.num_frames):
        image = Image.new("L", (scene.size, scene.size), 0)
        draw = ImageDraw.Draw(image)
        for i, shape in enumerate(scene.shapes):
            if shape.visible[0] <= t < shape.visible[1]:
                _draw(draw, shape, t, scene, fill=i + 1)
        labels[t] = np.asarray(image)
    return labels


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, t: int, scene: Scene, fill=None) -> None:
    cx, cy = (v * scene.size for v in shape.centre(t, scene.num_frames))
    r = shape.radius * scene.size
    fill = COLOURS[shape.colour] if fill is None else fill
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        s = r * 0.9  # a square of the same area as the circle looks the same size
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(((cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)), fill=fill)


def encode_clip(frames: np.ndarray, *, fps: float = CLIP_FPS, crf: int = 18) -> bytes:
    """H.264 (libx264, yuv420p) in MP4, what a phone or ffmpeg would hand the service.

    x264 runs without its assembly: with it, the bytes out depend on where the input sits in
    memory (alignment, heap contents), so the same frames could encode differently from one
    process to the next (2 clips in 80) and two training runs of the same seed saw different
    pixels. The C paths are deterministic, and at these frame sizes hardly slower.
    """
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "asm=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_clip(scene: Scene, path: str | os.PathLike, *, fps: float = CLIP_FPS) -> Path:
    path = Path(path)
    path.write_bytes(encode_clip(render(scene), fps=fps))
    return path


# -- questions ---------------------------------------------------------------------------------
def questions(scene: Scene, rng: random.Random | None = None) -> list[QA]:
    """Every question this scene answers unambiguously (presence: both yes and no when possible)."""
    rng = rng or random.Random(0)
    shapes, out = scene.shapes, []
    if scene.kind in ("static", "moving"):
        if len(shapes) >= 2:
            for s in shapes:
                out.append(QA(f"What colour is the {s.kind}?", s.colour, "binding"))
                out.append(QA(f"Which shape is {s.colour}?", s.kind, "binding"))
        out.append(QA("How many shapes are there?", NUMBERS[len(shapes)], "counting"))
        present = {s.kind for s in shapes}
        for kind in KINDS:
            out.append(QA(f"Is there a {kind}?", "yes" if kind in present else "no", "presence"))
        colours = {s.colour for s in shapes}
        yes_colour = rng.choice(sorted(colours))
        no_colour = rng.choice(sorted(set(COLOURS) - colours))
        out.append(QA(f"Is there a {yes_colour} shape?", "yes", "presence"))
        out.append(QA(f"Is there a {no_colour} shape?", "no", "presence"))
        for s in shapes:
            if s.direction is not None:
                out.append(QA(f"Which way does the {s.kind} move?", s.direction, "time"))
    elif scene.kind == "appear":
        out.append(QA("What appears at the end?", shapes[-1].kind, "time"))
    elif scene.kind == "disappear":
        out.append(QA("What disappears?", shapes[-1].kind, "time"))
    return out


def json_questions(scene: Scene) -> list[QA]:
    """The binding questions asked for a JSON answer: the shape each is about, as ``JSON_SCHEMA`` writes it.

    A question names one of the shape's kind or colour and the answer must give both, so the model
    must find the shape (the context token's job) to fill in the other value.
    """
    out = []
    for qa in questions(scene):
        if qa.qtype == "binding":
            shape = shape_named(scene, qa.question)
            answer = json.dumps({"colour": shape.colour, "shape": shape.kind})
            out.append(QA(qa.question + JSON_INSTRUCTION, answer, "json"))
    return out


def shape_named(scene: Scene, question: str) -> Shape:
    """The shape a binding question is about: the one whose kind or colour it names (both are unique per scene)."""
    words = set(question.rstrip("?").lower().split())
    return next(s for s in scene.shapes if s.kind in words or s.colour in words)


def scene_for(rng: random.Random, qtype: str) -> Scene:
    """A scene that can answer a question of ``qtype``."""
    if qtype == "binding":
        return make_scene(rng, rng.choice(("static", "moving")), rng.choice((2, 2, 3)))
    if qtype == "time":
        kind = rng.choice(("appear", "disappear", "moving"))
        return make_scene(rng, kind, rng.choice((2, 3)) if kind != "moving" else rng.randint(1, 3))
    if qtype in ("counting", "presence"):
        return make_scene(rng, rng.choice(("static", "moving")), rng.randint(1, 3))
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def pick_question(rng: random.Random, scene: Scene, qtype: str) -> QA:
    candidates = [qa for qa in questions(scene, rng) if qa.qtype == qtype]
    if qtype == "presence":  # balance yes / no
        want = rng.choice(("yes", "no"))
        candidates = [qa for qa in candidates if qa.answer == want] or candidates
    return rng.choice(candidates)


@dataclass(frozen=True)
class Example:
    scene: Scene
    qa: QA


def make_example(seed: int, qtype: str | None = None) -> Example:
    """One scene and one question, fully determined by ``seed`` (and ``qtype`` if given)."""
    rng = random.Random(seed)
    qtype = qtype or rng.choice(QUESTION_TYPES)
    scene = scene_for(rng, qtype)
    return Example(scene, pick_question(rng, scene, qtype))


def make_eval_clip(seed: int, folder: str | os.PathLike, qtype: str | None = None) -> tuple[Path, list[str], list[str]]:
    """Write a fresh clip to ``folder``; return (path, questions, answers) for it.

    For the service's end-to-end tests: the file goes through the real upload / decode path.
    """
    example = make_example(seed, qtype)
    qas = [qa for qa in questions(example.scene, random.Random(seed)) if qtype is None or qa.qtype == qtype]
    path = write_clip(example.scene, Path(folder) / f"clip-{seed}.mp4")
    return path, [qa.question for qa in qas], [qa.answer for qa in qas]


def corpus() -> list[str]:
    """Every question and answer the generator can produce (for training the tokenizers)."""
    lines = ["What appears at the end?", "What disappears?", "How many shapes are there?"]
    for kind in KINDS:
        lines += [f"What colour is the {kind}?", f"Is there a {kind}?", f"Which way does the {kind} move?"]
    for colour in COLOURS:
        lines += [f"Which shape is {colour}?", f"Is there a {colour} shape?"]
    lines += [*COLOURS, *KINDS, *DIRECTIONS, *NUMBERS, "yes", "no"]
    return lines
