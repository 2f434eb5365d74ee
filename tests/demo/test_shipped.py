"""The shipped demo checkpoint: the default model, in the official layout, recorded, and still right.

A change to the loader, the tokens or the prompt that breaks the released-checkpoint path breaks
these answers too; the full table (100 clips per type, every ablation) is ``bench/demo_eval.py``.
"""

from __future__ import annotations

import json
import random

import pytest

from model.demo import SHIPPED_DIR, TRAINED_DEMO_KIND, data, default_model_dir, is_trained_demo, shipped_dir
from model.demo.cli import _reproduction_line, _shipped_digests
from model.demo.evaluate import ModelAnswerer, eval_clips, run_eval, summarise
from model.demo.train import TrainConfig
from server.cli import main as cli_main


@pytest.fixture(scope="module")
def shipped():
    from model.loader import load_llamavid

    assert shipped_dir() == SHIPPED_DIR, "model/demo/checkpoint is missing"
    return load_llamavid(SHIPPED_DIR, device="cpu")


def test_it_is_the_default_model_and_in_the_official_layout():
    assert default_model_dir() == SHIPPED_DIR and is_trained_demo(SHIPPED_DIR)
    names = {p.name for p in SHIPPED_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "qformer_tokenizer", "eva_vit_g.pth"} <= names
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_vision_tower"].endswith("eva_vit_g.pth")
    assert sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file()) < 20 * 2**20


def test_training_record_names_command_and_seed():
    record = json.loads((SHIPPED_DIR / "training.json").read_text())
    assert record["kind"] == TRAINED_DEMO_KIND
    assert record["command"].startswith("llamavid train-demo ") and "--seed" in record["command"]
    assert record["seed"] == record["config"]["seed"]
    assert record["command"] in (SHIPPED_DIR / "TRAINING.md").read_text()
    assert set(record["weights_sha256"]) == {"stage1_vision", "stage2_qformer", "stage3_llamavid", "final"}


def test_a_rerun_of_the_recorded_command_is_checked_against_the_shipped_weights():
    # The recorded command uses the defaults, so a rerun compares itself with the shipped digests.
    digests = _shipped_digests(TrainConfig())
    record = json.loads((SHIPPED_DIR / "training.json").read_text())
    assert digests == record["weights_sha256"]
    assert "identical bit for bit" in _reproduction_line(digests, dict(digests))
    assert "differ from stage2_qformer on" in _reproduction_line(digests, {**digests, "stage2_qformer": "0", "final": "0"})
    assert _shipped_digests(TrainConfig(steps=10)) is None  # another config: nothing to compare with


def test_answers_fresh_clips_and_needs_the_context_token_for_binding(shipped):
    records = run_eval(shipped, seed=7, per_type=6, ablations=["full", "no_context"])
    summary = summarise(records)
    assert summary["full"]["overall"] >= 0.8, summary
    assert summary["full"]["binding"] >= 0.75, summary
    assert summary["no_context"]["binding"] <= summary["full"]["binding"] - 0.25, summary


def test_the_served_path_answers_as_the_models_own_loop(shipped, tmp_path):
    """``eval-demo`` answers through the in-process engine (extraction into the feature cache,
    the runner, the batched decoder); on fresh clips it says exactly what ``llamavid ask``'s loop says."""
    from server.worker.offline import OfflineEngine

    direct = ModelAnswerer(shipped)
    with OfflineEngine(shipped, fps=data.CLIP_FPS) as served:
        for clip_seed, qtype in eval_clips(11, 2):
            example = data.make_example(clip_seed, qtype)
            path = data.write_clip(example.scene, tmp_path / f"{clip_seed}.mp4")
            features, ref = direct.read(path), served.read(path)
            for qa in data.questions(example.scene, random.Random(clip_seed)):
                assert served.answer(ref, qa.question) == direct.answer(features, qa.question), qa.question
        frames_encoded = served.engine.metrics.frames_encoded._value.get()
    assert frames_encoded == sum(data.make_example(s, t).scene.num_frames for s, t in eval_clips(11, 2))


def test_eval_demo_command_writes_its_table(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli_main(["eval-demo", "--per-type", "1", "--ablations", "full,no_content", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(SHIPPED_DIR) and set(report["summary"]) == {"full", "no_content"}
    assert report["path"] == "served"
    assert report["json"]["questions"] >= 2 and report["json"]["valid_json"] == 1.0  # under the grammar, always
    out = capsys.readouterr().out
    assert "| full: both tokens" in out and report["json"]["line"] in out


def test_train_demo_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train-demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--seed" in text and "--out" in text and "--vision-steps" in text and "--format-steps" in text
