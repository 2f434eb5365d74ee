"""The ``llamavid`` command line: one flag per setting, and a clear word when the server extra is missing."""

from __future__ import annotations

import pytest

from server import cli
from server.settings import Settings


def test_serve_help_lists_a_flag_per_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text, name
    assert "LLAMAVID_MAX_RUNNING" in text and "REDIS_URL" in text


@pytest.mark.parametrize("command", ["serve", "api", "worker"])
@pytest.mark.parametrize("argv", [["--help"], ["--port", "9000"]], ids=["help", "flags"])
def test_without_the_server_extra_it_says_how_to_install_it(monkeypatch, capsys, command: str, argv: list[str]) -> None:
    monkeypatch.setattr(cli, "_missing_server_extra", lambda: "fastapi")
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "fastapi is not installed" in err and "pip install 'llamavid-serve[server]'" in err


def test_the_server_extra_is_found_when_installed() -> None:
    assert cli._missing_server_extra() is None


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_model_that_cannot_fit_is_refused_before_serving(tiny_checkpoint, tmp_path, command: str) -> None:
    """No /ready, no first question: the process stops at once, with the memory plan in its log."""
    from tests.serving import free_port, spawn

    env = {"LLAMAVID_MODEL": str(tiny_checkpoint), "LLAMAVID_DEVICE": "cpu", "LLAMAVID_KV_CACHE_BYTES": "4096",
           "LLAMAVID_REDIS_URL": "redis://127.0.0.1:6379/0"}
    process = spawn(command, env, tmp_path / "refused.log", free_port())
    assert process.proc.wait(timeout=60) == 2
    log = process.output()
    assert "does not fit this device as configured" in log and "KV cache" in log and "positions held at once" in log
