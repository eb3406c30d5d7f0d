"""`shoal generate` and `shoal chat`: offline generation from the command line."""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

from shoal.config import ModelConfig
from shoal.entrypoints.engine_args import add_engine_args, add_model_args
from shoal.entrypoints.engine_args import config_default as _default
from shoal.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shoal.entrypoints.llm import LLM

EXIT_COMMANDS = ("/exit", "/quit")
CHAT_MAX_TOKENS = 512


def register(subparsers: Any) -> None:
    """Add `generate` and `chat` to the `shoal` command's subparsers."""
    gen = subparsers.add_parser(
        "generate",
        help="complete one prompt offline and print the completion",
        description="Load a model in this process, complete PROMPT and print the completion.",
    )
    gen.add_argument(
        "prompt", help="the prompt text ('-' reads it from stdin, without its trailing newlines)"
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the chat template",
    )
    _add_engine_args(gen)
    _add_sampling_args(gen, max_tokens=_default(SamplingParams, "max_tokens"))
    gen.add_argument(
        "--n",
        type=int,
        default=_default(SamplingParams, "n"),
        help="completions to generate (default: %(default)s)",
    )
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (reads stdin line by line)",
        description="An interactive conversation: each stdin line is a user message; the "
        "reply is streamed to stdout. /exit or end of input quits.",
    )
    chat.add_argument("--system", default=None, help="a system message to start with")
    _add_engine_args(chat)
    _add_sampling_args(chat, max_tokens=CHAT_MAX_TOKENS)
    chat.set_defaults(func=run_chat)


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="a Hugging Face directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    add_model_args(g)
    add_engine_args(g)


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help="tokens to generate at most (default: %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=_default(SamplingParams, "temperature"),
        help="0 = greedy (default: %(default)s)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=_default(SamplingParams, "top_p"),
        help="(default: %(default)s)",
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=_default(SamplingParams, "top_k"),
        help="0 or -1 = off (default: %(default)s)",
    )
    g.add_argument(
        "--min-p",
        type=float,
        default=_default(SamplingParams, "min_p"),
        help="(default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for sampling (and dummy weights); unseeded by default",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STRING",
        help="stop at this string (repeatable)",
    )
    g.add_argument("--ignore-eos", action="store_true", help="keep going past EOS")


def _sampling_params(args: argparse.Namespace, **extra: Any) -> SamplingParams:
    if args.max_tokens is not None and args.max_tokens < 1:
        # SamplingParams allows 0 (prompt only): nothing a command line wants printed.
        raise ValueError("--max-tokens: must be at least 1")
    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            stop=args.stop or [],
            ignore_eos=args.ignore_eos,
            **extra,
        )
    except ValueError as e:  # name the flag, not the field
        field, _, message = str(e).partition(": ")
        raise ValueError(f"--{field.replace('_', '-')}: {message}") from e


def _load_llm(args: argparse.Namespace) -> LLM:
    """Build the LLM, telling stderr what is loading and how long it took."""
    from shoal.entrypoints.llm import LLM

    name = args.model or "the default model (SmolLM2-135M-Instruct)"
    print(f"Loading {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    llm = LLM(
        args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        load_format=args.load_format,
        device=args.device,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=args.seed if args.seed is not None else _default(ModelConfig, "seed"),
    )
    print(
        f"Loaded in {time.perf_counter() - start:.1f}s (max_model_len={llm.max_model_len})",
        file=sys.stderr,
        flush=True,
    )
    return llm


def run_generate(args: argparse.Namespace) -> int:
    """`shoal generate`: print each completion of the prompt (separated by a blank line)."""
    # `echo text | shoal generate -` ends the text with a newline the user did not mean as
    # part of the prompt (it would change what comes next): trailing newlines are dropped.
    prompt = sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    params = _sampling_params(args, n=args.n)
    llm = _load_llm(args)
    if args.chat:
        (result,) = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        (result,) = llm.generate(prompt, params, use_tqdm=False)
    print("\n\n".join(o.text for o in result.outputs), flush=True)
    return 0


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """`shoal chat`: a REPL keeping the whole conversation; each reply streams to stdout.

    Ctrl-C while a reply streams stops it (what came so far stays in the conversation);
    Ctrl-C at the prompt right after that, or twice in a row, or Ctrl-D, exits (0). Never
    a traceback: Ctrl-C while the model loads exits with 130.

    On a terminal Ctrl-C works even when the process started with SIGINT ignored (a
    background job of a non-interactive shell: `cmd &` in a script, `nohup`), where Python
    installs no KeyboardInterrupt handler at all and Ctrl-C at the prompt did nothing."""
    stdin = stdin or sys.stdin
    if (
        stdin.isatty()
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _chat(args, stdin)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace, stdin: TextIO) -> int:
    params = _sampling_params(args)
    llm = _load_llm(args)
    interactive = stdin.isatty()
    conversation: list[dict[str, str]] = []
    if args.system:
        conversation.append({"role": "system", "content": args.system})
    if interactive:
        print("Type a message; /exit or Ctrl-D quits, Ctrl-C stops a reply.", file=sys.stderr)
    interrupts = _Interrupts()
    exit_armed = False  # the last thing the user did was a Ctrl-C
    while True:
        try:  # the prompt inside: a Ctrl-C right after it still counts as one at the prompt
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
                _wait_for_input(stdin)
            line = stdin.readline()
        except KeyboardInterrupt:
            if exit_armed:
                print(file=sys.stderr)
                return 0
            exit_armed = True
            print("\n(Ctrl-C again or Ctrl-D to exit)", file=sys.stderr)
            continue
        if not line or line.strip() in EXIT_COMMANDS:
            if interactive and not line:
                print(file=sys.stderr)
            return 0
        exit_armed = False
        if not line.strip():
            continue
        conversation.append({"role": "user", "content": line.rstrip("\n")})
        with interrupts.deferred():
            reply = _stream_reply(llm, conversation, params, interrupts)
        if reply is None:
            conversation.pop()  # did not fit: forget the turn, keep the conversation
        else:
            conversation.append({"role": "assistant", "content": reply})
        if interrupts.stop:
            exit_armed = True
            print("[stopped]", file=sys.stderr, flush=True)


def _wait_for_input(stdin: TextIO) -> None:
    """Return once `stdin` has input, waking every 0.2 s meanwhile.

    The kernel may deliver a Ctrl-C's SIGINT to any thread that does not block it (the
    engine's OpenMP threads among them). Python then only sets a flag, and a main thread
    blocked in read() would not see it until the next line: waking up runs the handler.
    Only for a terminal: in canonical mode each read returns at most one line, so nothing
    waits in `stdin`'s buffer that select() cannot see."""
    with contextlib.suppress(OSError, ValueError):  # not a real file: readline decides
        while not select.select([stdin], [], [], 0.2)[0]:
            pass


class _Interrupts:
    """SIGINT while a reply streams only sets `stop`: the engine is never interrupted in the
    middle of a step, and the stream is closed (its request aborted) between two outputs.
    Elsewhere SIGINT keeps raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.stop = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.stop = False
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True


def _stream_reply(
    llm: LLM,
    conversation: list[dict[str, str]],
    params: SamplingParams,
    interrupts: _Interrupts | None = None,
) -> str | None:
    """Stream the assistant's reply to stdout; None (and a message on stderr) if the
    conversation no longer fits the context. The reply is cut to the context left, and
    ends early once `interrupts.stop` is set."""
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(conversation), add_special_tokens=False
    )
    room = llm.max_model_len - len(prompt_ids)
    if room < 1:
        print(
            f"error: the conversation ({len(prompt_ids)} tokens) no longer fits the context "
            f"({llm.max_model_len} tokens); the message was dropped",
            file=sys.stderr,
        )
        return None
    if params.max_tokens is None or params.max_tokens > room:
        params = msgspec.structs.replace(params, max_tokens=room)
    pieces = []
    try:
        stream = llm.stream(prompt_ids, params)
        try:
            for output in stream:
                piece = output.outputs[0].text if output.outputs else ""
                pieces.append(piece)
                print(piece, end="", flush=True)
                if interrupts is not None and interrupts.stop:
                    break
        finally:
            close = getattr(stream, "close", None)  # a generator: closing it aborts the request
            if close is not None:
                close()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return None
    print(flush=True)
    return "".join(pieces)
