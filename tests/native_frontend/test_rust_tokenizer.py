"""shoal-tokenizer (frontend-rs/tokenizer) against shoal's Python `Tokenizer` (Hugging Face
`tokenizers`): the same ids for a large mixed corpus, the same decoded text, and the same
streaming increments as `IncrementalDetokenizer`, for the default GGUF model and for a tiny
model directory (tokenizer.json); an unsupported tokenizer.json is a clear start-up error.

Drives `shoal-tokenizer-tool` (frontend-rs/tokenizer/src/bin/shoal-tokenizer-tool.rs, whose
header gives the JSON-lines protocol), one process per model; skips when the tool is not built
(tests/native_frontend/conftest.py::rust_binary).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from shoal.model_source import resolve_model
from shoal.processing.detokenizer import IncrementalDetokenizer
from shoal.processing.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT
from shoal.processing.tokenizer import _UNICODE_TO_BYTE, Tokenizer
from tests.helpers import make_tiny_model_dir
from tests.native_frontend.conftest import rust_binary

TOOL = "shoal-tokenizer-tool"
SEED = 20
CORPUS_SIZE = 3000

# ------------------------------------------------------------------------------ the corpus

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "server",
    "request", "stream", "model", "cache", "it's", "don't", "we're", "they've", "I'm", "you'll",
    "she'd", "IT'S", "WE'RE", "Hello", "World", "naïve", "café", "résumé", "coöperate", "über",
    "straße",
]  # fmt: skip
CODE = [
    "def f(x):\n    return x + 1\n",
    'if (a && b) {\n\tprintf("%d\\n", a);\n}\n',
    "    for i in range(10):\n        print(i)  \n\n",
    "class A:\n\tdef __init__(self) -> None:\n\t\tself.x = {'k': [1, 2, 3]}\n",
    "SELECT * FROM t WHERE id = 42;\r\n",
    "fn main() { let v: Vec<u32> = vec![0x1f, 0b1010]; }",
    '<div class="x">&amp;&lt;</div>',
    "x = a**2 // 3 - b@c != d ?? e ... f",
]
UNICODE = [
    "你好，世界。今天天气很好！",
    "日本語のテキストとカタカナ、ひらがな",
    "한국어 문장입니다",
    "Ελληνικά γράμματα",
    "Русский текст с цифрами 123",
    "مرحبا بالعالم ١٢٣٤",
    "שלום עולם",
    "हिन्दी में पाठ",
    "ภาษาไทยไม่มีช่องว่าง",
    "e\u0301 a\u0300 n\u0303 (combining marks)",
    "Ⅻ ² ½ １２３ ٣٤ ൧൨",  # numeric characters that are not ASCII digits
    "\u00a0non\u00a0breaking\u2003em\u3000ideographic",
    "zero\u200bwidth\u200cjoiner\u200d",
]
EMOJI = [
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "🇫🇷🇯🇵", "❤\ufe0f", "🧑🏿\u200d💻",
    "🫠", "✨🎉", "1\ufe0f\u20e3",
]  # fmt: skip
SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
    "<|im_st", "<|im_end", "<|", "|>", "<<|im_end|>>",
]  # fmt: skip
# byte -> its character in GPT-2's byte-level alphabet.
BYTE_CHARS = {byte: ch for ch, byte in _UNICODE_TO_BYTE.items()}
WHITESPACE = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\x0b",
]  # fmt: skip


def _random_chars(rng: random.Random, n: int) -> str:
    """Code points from everywhere: controls, Latin, CJK, private use, astral, noncharacters
    (surrogates left out: they are not text)."""
    ranges = [
        (0x00, 0x7F), (0x80, 0x2FF), (0x370, 0x1FFF), (0x2000, 0x2BFF), (0x3000, 0x9FFF),
        (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFB00, 0xFFFF), (0x10000, 0x1FAFF),
        (0x20000, 0x2A6DF), (0xE0000, 0xE007F), (0xF0000, 0x10FFFF),
    ]  # fmt: skip
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        return " ".join(words) + rng.choice(["", ".", "!", "?", ",", " ", "..."])
    if kind == 1:
        return rng.choice(CODE)
    if kind == 2:
        return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 6)))
    if kind == 3:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 14)))
    if kind == 4:
        return rng.choice(UNICODE)
    if kind == 5:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == 6:
        return rng.choice(SPECIALS)
    if kind == 7:
        return _random_chars(rng, rng.randint(1, 12))
    return rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "'", " '"])


def make_corpus(n: int = CORPUS_SIZE, seed: int = SEED) -> list[str]:
    """`n` deterministic strings mixing every fragment kind, plus edge cases."""
    rng = random.Random(seed)
    corpus = ["", " ", "\n", "a", "  leading", "trailing  ", "x" * 600, " " * 300 + "y", "9" * 50]
    corpus += [text for text in UNICODE + EMOJI + SPECIALS + CODE]
    while len(corpus) < n:
        corpus.append("".join(_fragment(rng) for _ in range(rng.randint(1, 8))))
    return corpus


# ------------------------------------------------------------------------------ the tool


class TokenizerTool:
    """One running shoal-tokenizer-tool: `call(request) -> reply` over JSON lines."""

    def __init__(self, model_path: str) -> None:
        self.proc = subprocess.Popen(
            [rust_binary(TOOL), model_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request; raises if the tool died."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"tool gave no reply (exit code {self.proc.poll()})"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _model_path(kind: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    if kind == "gguf":
        return resolve_model(None).path
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module", params=["gguf", "tiny"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Tokenizer, TokenizerTool]]:
    """(Python tokenizer, Rust tool) of one model: the default GGUF file or a tiny model
    directory holding the default tokenizer as tokenizer.json."""
    rust_binary(TOOL)  # skip before building anything
    path = _model_path(request.param, tmp_path_factory)
    python = (
        Tokenizer.from_gguf(path) if request.param == "gguf" else Tokenizer.from_pretrained(path)
    )
    tool = TokenizerTool(path)
    yield python, tool
    tool.close()
    if request.param == "tiny":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


# ------------------------------------------------------------------------------ the tests


def test_info_matches_python(pair: tuple[Tokenizer, TokenizerTool]) -> None:
    python, tool = pair
    info = tool.call({"op": "info"})
    assert info["vocab_size"] == python.vocab_size
    assert info["eos_token_ids"] == python.eos_token_ids
    assert info["special_tokens"] == python.special_tokens
    assert info["special_ids"] == python.all_special_ids
    assert info["bos_token_id"] == python.bos_token_id
    assert info["chat_template"] == python.chat_template


def test_encode_matches_python(pair: tuple[Tokenizer, TokenizerTool], corpus: list[str]) -> None:
    python, tool = pair
    mismatches = []
    for i, text in enumerate(corpus):
        add_special = i % 2 == 0
        want = python.encode(text, add_special_tokens=add_special)
        got = tool.call({"op": "encode", "text": text, "add_special_tokens": add_special})
        if got.get("ids") != want:
            mismatches.append((text, want, got))
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} differ, first: {mismatches[:3]!r}"


def test_decode_matches_python(pair: tuple[Tokenizer, TokenizerTool], corpus: list[str]) -> None:
    python, tool = pair
    rng = random.Random(SEED + 1)
    id_lists = [python.encode(text, add_special_tokens=False) for text in corpus[::3]]
    # Random ids: partial characters, invalid UTF-8, special tokens anywhere, ids past the
    # vocabulary (left out by both).
    id_lists += [
        [rng.randrange(python.vocab_size + 5) for _ in range(rng.randint(1, 20))]
        for _ in range(300)
    ]
    mismatches = []
    for ids in id_lists:
        for skip in (True, False):
            want = python.decode(ids, skip_special_tokens=skip)
            got = tool.call({"op": "decode", "ids": ids, "skip_special_tokens": skip})
            if got.get("text") != want:
                mismatches.append((ids, skip, want, got))
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[:3]!r}"


def _byte_ids(python: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte of `data` (the default vocabulary lacks a few bytes
    that UTF-8 text never holds, e.g. 0xFF)."""
    ids = []
    for b in data:
        token_id = python.backend.token_to_id(BYTE_CHARS[b])
        assert token_id is not None, f"no token for byte {b:#x}"
        ids.append(token_id)
    return ids


def _stream_cases(python: Tokenizer, corpus: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids): corpus texts cut anywhere, and byte-token sequences whose
    multi-byte characters are split across tokens, incl. prompts ending mid-character and
    invalid UTF-8."""
    rng = random.Random(SEED + 2)
    cases = []
    for text in corpus[::4]:
        ids = python.encode(text, add_special_tokens=False)
        cut = rng.randint(0, len(ids))
        cases.append((ids[:cut], ids[cut:]))
    specials = [python.all_special_ids[1], python.all_special_ids[2]]  # <|im_start|>, <|im_end|>
    for _ in range(200):
        text = "".join(rng.choice(EMOJI + UNICODE + WORDS) for _ in range(rng.randint(1, 4)))
        data = text.encode("utf-8")
        if rng.random() < 0.3:  # invalid sequences: stray continuation / truncated lead bytes
            pos = rng.randint(0, len(data))
            bad = rng.choice([b"\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90", b"\xf0\x9f"])
            data = data[:pos] + bad + data[pos:]
        ids = _byte_ids(python, data)
        if rng.random() < 0.3:
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        cut = rng.randint(0, len(ids))
        prompt = python.encode(rng.choice(WORDS), add_special_tokens=False) + ids[:cut]
        cases.append((prompt, ids[cut:] + python.encode(" ok é", add_special_tokens=False)))
    for _ in range(100):  # any ids at all, the prompt's included
        prompt = [rng.randrange(python.vocab_size) for _ in range(rng.randint(0, 8))]
        cases.append(
            (prompt, [rng.randrange(python.vocab_size) for _ in range(rng.randint(1, 30))])
        )
    return cases


def test_stream_matches_python_detokenizer(
    pair: tuple[Tokenizer, TokenizerTool], corpus: list[str]
) -> None:
    python, tool = pair
    mismatches = []
    cases = _stream_cases(python, corpus)
    split_chars = 0
    for n, (prompt, ids) in enumerate(cases):
        skip = n % 2 == 0
        detok = IncrementalDetokenizer(python, prompt, skip_special_tokens=skip)
        want = [detok.update([token_id]) for token_id in ids]
        split_chars += want.count("")
        got = tool.call(
            {"op": "stream", "prompt_ids": prompt, "ids": ids, "skip_special_tokens": skip}
        )
        if got.get("pieces") != want:
            mismatches.append((prompt, ids, skip, want, got))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:2]!r}"
    assert split_chars > 100  # the cases did hold characters split across tokens


def test_stream_prompt_ending_mid_character(pair: tuple[Tokenizer, TokenizerTool]) -> None:
    python, tool = pair
    emoji = _byte_ids(python, "😀".encode())
    prompt = python.encode("Hi ", add_special_tokens=False) + emoji[:2]
    ids = emoji[2:] + python.encode(" there", add_special_tokens=False)
    got = tool.call({"op": "stream", "prompt_ids": prompt, "ids": ids, "skip_special_tokens": True})
    detok = IncrementalDetokenizer(python, prompt, skip_special_tokens=True)
    assert got["pieces"] == [detok.update([i]) for i in ids]
    assert got["pieces"][:2] == ["", ""]  # nothing while inside the character


def test_tool_errors_are_replies(pair: tuple[Tokenizer, TokenizerTool]) -> None:
    _, tool = pair
    assert "error" in tool.call({"op": "nope"})
    assert "error" in tool.call({"op": "decode", "ids": [-1]})
    assert "error" in tool.call({"op": "encode"})
    assert tool.call({"op": "decode", "ids": [], "skip_special_tokens": True}) == {"text": ""}


def test_unsupported_tokenizer_json_is_a_clear_error(tmp_path: Any) -> None:
    rust_binary(TOOL)
    path = make_tiny_model_dir(str(tmp_path / "model"))
    with open(f"{path}/tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    with open(f"{path}/tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(data, f)
    tool = TokenizerTool(path)
    try:
        reply = tool.call({"op": "encode", "text": "hi", "add_special_tokens": False})
    finally:
        tool.close()
    assert "Metaspace" in reply["error"] and "pre_tokenizer" in reply["error"]


def _edit_llama3(data: dict[str, Any], config: dict[str, Any]) -> None:
    data["pre_tokenizer"] = _split_then_bytes(_LLAMA3_SPLIT)
    data["model"]["ignore_merges"] = True


def _edit_qwen2(data: dict[str, Any], config: dict[str, Any]) -> None:
    data["pre_tokenizer"] = _split_then_bytes(_QWEN2_SPLIT)
    data["normalizer"] = {"type": "NFC"}


def _edit_bos_and_flags(data: dict[str, Any], config: dict[str, Any]) -> None:
    config["add_bos_token"] = True
    data["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    for token in data["added_tokens"]:
        if token["content"] == "<|im_end|>":
            token["lstrip"] = token["rstrip"] = True
    # A new, non-special, normalized token (id past the vocabulary), and one matched whole.
    data["added_tokens"].append(
        {"id": 49152, "content": "tokenizer server", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": True, "special": False}
    )  # fmt: skip


def _split_then_bytes(pattern: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }  # fmt: skip


VARIANTS = {
    "llama3_split": _edit_llama3,
    "qwen2_split_nfc": _edit_qwen2,
    "bos_and_flags": _edit_bos_and_flags,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokenizer_json_variants_match_python(
    variant: str, tmp_path: Any, corpus: list[str]
) -> None:
    """The other tokenizer.json shapes: Split regex + ByteLevel (Llama 3 / Qwen2 patterns),
    NFC, ignore_merges, BOS added by add_bos_token, lstrip/rstrip and normalized tokens."""
    rust_binary(TOOL)
    path = make_tiny_model_dir(str(tmp_path / "model"))
    with open(f"{path}/tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    with open(f"{path}/tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    VARIANTS[variant](data, config)
    with open(f"{path}/tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(data, f)
    with open(f"{path}/tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(f"{path}/generation_config.json", "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    python = Tokenizer.from_pretrained(path)
    texts = corpus[::6] + [
        "tokenizer server",
        "a tokenizer server!",
        "x  <|im_end|>  y",
        "cafe\u0301 A\u030a",
    ]
    if variant == "bos_and_flags":  # the edits are in force
        ids = python.encode("a tokenizer server")
        assert ids[0] == python.bos_token_id and ids[-1] == 49152
    if variant == "qwen2_split_nfc":
        assert python.encode("e\u0301", False) == python.encode("\u00e9", False)
    tool = TokenizerTool(path)
    try:
        info = tool.call({"op": "info"})
        assert info["vocab_size"] == python.vocab_size
        assert info["eos_token_ids"] == python.eos_token_ids == [2, 0]
        mismatches = []
        for i, text in enumerate(texts):
            want = python.encode(text, add_special_tokens=i % 2 == 0)
            got = tool.call({"op": "encode", "text": text, "add_special_tokens": i % 2 == 0})
            if got.get("ids") != want:
                mismatches.append((text, want, got))
            decoded = tool.call({"op": "decode", "ids": want, "skip_special_tokens": True})
            if decoded.get("text") != python.decode(want, skip_special_tokens=True):
                mismatches.append((text, want, decoded))
    finally:
        tool.close()
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[:3]!r}"


def test_missing_model_is_a_clear_error(tmp_path: Any) -> None:
    rust_binary(TOOL)
    tool = TokenizerTool(str(tmp_path))  # a directory without tokenizer.json
    try:
        reply = tool.call({"op": "info"})
    finally:
        tool.close()
    assert "no tokenizer.json" in reply["error"]
