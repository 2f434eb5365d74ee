"""Shared fixtures: random-weight LLaMA-VID checkpoints made by the project itself.

``model.tools.tiny.make_tiny`` writes a checkpoint in the released layout (sharded bf16 ``.bin`` with
official key names, ``eva_vit_g.pth``, a CLIP processor folder, ``tokenizer.model`` and the
Q-Former's vocabulary) in about a second, and it loads through the real loader, so nothing has
to be downloaded. The folders are session-scoped and must be treated as read-only: a test that
needs to change one copies it first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset (56 px EVA, 16 patches, ``mean`` compression), two ``.bin`` shards + index."""
    from model.tools.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama-vid-tiny", "tiny", fmt="bin", num_shards=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The tiny checkpoint loaded on the CPU in fp32. Shared: never modify it in a test."""
    from model.loader import load_llamavid

    return load_llamavid(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_frames() -> np.ndarray:
    """Three random uint8 RGB frames [3, 60, 80, 3] (landscape, so the center crop matters)."""
    return np.random.default_rng(1234).integers(0, 256, (3, 60, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model wide enough that one decode step takes tens of milliseconds on a CPU core (a 1536-wide,
    4-layer LLM), and one that never ends an answer on its own: its EOS row of ``lm_head`` is zero,
    so EOS's logit (0) never beats the best of a thousand random ones. Counting the
    tokens generated after a client hangs up then measures the server, not the few milliseconds
    between the test's last look at the counter and its hang-up."""
    import json

    from safetensors.torch import load_file, save_file

    from model.tools.tiny import TinySpec, make_tiny

    spec = TinySpec(hidden=1536, layers=4, heads=12, intermediate=4128, vocab=1000)
    out = make_tiny(tmp_path_factory.mktemp("slow") / "llama-vid-slow", spec, fmt="safetensors", num_shards=1)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state["lm_head.weight"][json.loads((out / "config.json").read_text())["eos_token_id"]] = 0
    save_file(state, str(weights), metadata={"format": "pt"})
    return out


def serve_demo(folder: Path):
    """``llamavid serve`` on the shipped trained demo checkpoint (right answers, unlike the random
    models), working in ``folder``; it must log no traceback."""
    from model.demo import is_trained_demo, shipped_dir
    from tests.serving import start_server

    checkpoint = shipped_dir()
    assert checkpoint is not None and is_trained_demo(checkpoint), \
        "the trained demo checkpoint is not in model/demo/checkpoint"
    server = start_server(folder, checkpoint)
    yield server
    server.stop()
    assert "Traceback" not in server.output(), server.output()[-4000:]


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """One demo server shared by the tests that only ask it questions."""
    yield from serve_demo(tmp_path_factory.mktemp("demo"))
