"""Parity against the official code's outputs: the vendored cases, plus any in ``../shared/parity``.

Every folder with a ``case.json`` is a case: a checkpoint, the reference's inputs
(``frames_uint8``) and every intermediate tensor the official code produced. ``run_case``
recomputes them all from the inputs and compares at 1e-4 relative error plus identical greedy ids.
``tests/model/parity_cases`` holds the two published cases, so a clean clone (CI included) always
runs them; further cases in the same format next to the repository are run too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.tools.parity import TOLERANCE, run_case
from server.cli import main as cli_main

VENDORED_DIR = Path(__file__).resolve().parent / "parity_cases"
SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "parity"


def _cases(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*")) if (p / "case.json").is_file()} if folder.is_dir() else {}


# A shared case of the same name as a vendored one is the same case: the vendored copy runs.
CASES = sorted({**_cases(SHARED_DIR), **_cases(VENDORED_DIR)}.values(), key=lambda p: p.name)


def test_the_published_cases_are_vendored() -> None:
    assert {"video", "image"} <= set(_cases(VENDORED_DIR)), f"{VENDORED_DIR} lost a parity case"


@pytest.mark.parametrize("case_dir", CASES, ids=[p.name for p in CASES])
def test_parity_case(case_dir: Path) -> None:
    report = run_case(case_dir)
    failed = {name: r for name, r in report["tensors"].items() if not (r.get("ok") or r.get("equal"))}
    assert report["ok"], f"{case_dir.name}: tensors off {failed}; greedy {report['greedy_ids']}"
    # The comparison really covered the reference's outputs, not an empty set.
    expected = load_file(str(case_dir / "expected.safetensors"))
    compared = set(report["tensors"]) | {"greedy_ids"}
    assert set(expected) - {"frames_uint8", "greedy_min_margin"} <= compared
    assert all(r.get("rel_err", 0.0) <= TOLERANCE for r in report["tensors"].values())
    assert report["greedy_ids_equal"] and len(report["greedy_ids"]["ours"]) == len(expected["greedy_ids"])


def _perturbed_case(case_dir: Path, dst: Path) -> Path:
    """A copy of ``case_dir`` (checkpoint linked, not copied) with the reference logits nudged by 1e-3."""
    dst.mkdir()
    (dst / "case.json").write_text((case_dir / "case.json").read_text())
    (dst / "checkpoint").symlink_to(case_dir / "checkpoint", target_is_directory=True)
    expected = load_file(str(case_dir / "expected.safetensors"))
    logits = expected["logits"].float()
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    expected["logits"] = (logits + noise * (1e-3 * logits.norm() / noise.norm())).to(expected["logits"].dtype)
    save_file(expected, str(dst / "expected.safetensors"))
    return dst


def test_cli_parity_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case_dir = CASES[0]
    assert cli_main(["parity", "--case", str(case_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True

    # A reference tensor off by 1e-3 relative must fail: the comparison is not vacuous. ``main``'s
    # return value is the process exit status (the console script runs ``sys.exit(main())``).
    bad = _perturbed_case(case_dir, tmp_path / "perturbed")
    assert cli_main(["parity", "--case", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["tensors"]["logits"]["ok"] is False
    assert report["tensors"]["logits"]["rel_err"] == pytest.approx(1e-3, rel=0.05)
    # Only the perturbed tensor fails.
    assert all(r.get("ok", r.get("equal")) for name, r in report["tensors"].items() if name != "logits")
