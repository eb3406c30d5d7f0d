"""Repository promises: README's commands and CI agree."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_serve_and_test_commands() -> None:
    serve, test = _readme_commands()[:2]
    assert "shoal serve" in serve
    assert "pytest" in test


def test_ci_runs_readme_test_command() -> None:
    test_command = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_cli_help_lists_subcommands(capsys) -> None:
    from shoal.entrypoints.cli import main

    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
