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
