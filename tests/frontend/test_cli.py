"""`shoal generate` and `shoal chat` on a tiny random-weight model."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from shoal import LLM, SamplingParams
from shoal.entrypoints.cli import main

ENGINE_FLAGS = ["--load-format", "dummy", "--num-blocks", "128"]


def test_generate_prints_the_completion(tiny_model_dir: str) -> None:
    argv = [
        "generate",
        "Hello there",
        "--model",
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "shoal.entrypoints.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Loading " in result.stderr and "Loaded in" in result.stderr
    llm = LLM(tiny_model_dir, load_format="dummy", num_blocks=128)
    (expected,) = llm.generate(
        "Hello there", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    assert result.stdout == expected.outputs[0].text + "\n"


def test_generate_n_and_stdin_prompt(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there"))
    argv = [
        "generate",
        "-",
        "--model",
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--max-tokens",
        "4",
        "--n",
        "2",
        "--seed",
        "3",
        "--ignore-eos",
        "--stop",
        "zzz",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n\n") >= 1  # two completions, separated by a blank line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "--temperature: must be non-negative"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--max-tokens", "0"], "--max-tokens: must be at least 1"),
        (["--block-size", "3"], "--block-size: must be a positive power of two"),
    ],
)
def test_bad_flags_name_the_flag(
    tiny_model_dir: str, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--model", tiny_model_dir, *ENGINE_FLAGS, *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_chat_keeps_the_conversation(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\nHow are you?\n/exit\nnot read\n"))
    argv = [
        "chat",
        "--model",
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--stop",
        "\n",
        "--system",
        "Be kind.",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    replies = captured.out.split("\n")
    assert len(replies) == 3 and replies[2] == ""  # two replies, each ending its line
    assert "Loaded in" in captured.err and "> " not in captured.err  # stdin is not a tty
    # The second reply continues the whole conversation, as a direct chat() call does.
    llm = LLM(tiny_model_dir, load_format="dummy", num_blocks=128)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop=["\n"])
    conversation = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "How are you?"},
    ]
    (second,) = llm.chat(conversation, params)
    assert replies[1] == second.outputs[0].text


def test_chat_ends_at_eof_and_survives_an_overlong_turn(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long_line = "word " * 300
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_line}\nshort\n"))
    argv = [
        "chat",
        "--model",
        tiny_model_dir,
        *ENGINE_FLAGS,
        "--max-model-len",
        "128",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--ignore-eos",
        "--stop",
        "\n",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "error: the conversation" in captured.err and "no longer fits" in captured.err
    assert captured.out.count("\n") == 1  # only the short turn got a reply


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from shoal import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"shoal {__version__}"


def test_generate_from_stdin_drops_the_trailing_newline(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`echo "..." | shoal generate -` answers as the same prompt given as an argument: the
    newline echo adds is not part of the prompt."""
    flags = ["--model", tiny_model_dir, *ENGINE_FLAGS, "--max-tokens", "6", "--temperature", "0"]
    flags += ["--ignore-eos"]
    outputs = []
    for prompt, stdin in (("Hello there", ""), ("-", "Hello there\n"), ("Hello there\n", "")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        assert main(["generate", prompt, *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    # The control: a newline that is part of the prompt changes the answer (else the
    # comparison above could not fail).
    assert outputs[2] != outputs[0]


def test_the_old_console_script_entry_point_still_resolves() -> None:
    """Installs made before the move wrote `shoal = shoal.cli:main` into their console script."""
    import shoal.cli

    assert shoal.cli.main is main
