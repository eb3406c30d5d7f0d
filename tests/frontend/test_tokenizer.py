"""Tokenizer: GGUF and Hugging Face loading, encode/decode, chat templates, save/reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest

from shoal.gguf_file import GGUFFile
from shoal.model_source import default_model_path
from shoal.processing.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "  leading spaces\n\n\ttabs and\r\nCRLF   trailing   ",
    "héllo wörld — 你好，世界 🎉🚀 👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square\n",
]


def test_default_gguf_tokenizer_basics(default_tokenizer: Tokenizer) -> None:
    tok = default_tokenizer
    assert tok.vocab_size == 49152 == len(tok)
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.special_tokens["eos_token"] == "<|im_end|>"
    assert tok.all_special_ids == list(range(17))
    assert "<|im_start|>" in tok.all_special_tokens
    # SmolLM adds no BOS; special-token strings in text map to their ids.
    assert tok.encode("<|im_start|>user")[0] == 1
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(default_tokenizer: Tokenizer, text: str) -> None:
    ids = default_tokenizer.encode(text)
    assert default_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert default_tokenizer.decode(ids) == text.replace("<|im_start|>", "").replace(
        "<|im_end|>", ""
    )


def test_smollm_digits_stand_alone(default_tokenizer: Tokenizer) -> None:
    # SmolLM's tokenizer.json splits every digit before the GPT-2 regex, so "\r\n" before a
    # digit stays one token ("čĊ", 2738), as llama.cpp's "smollm" pre-tokenizer does too.
    ids = default_tokenizer.encode("x\r\n6")
    assert ids[1] == 2738
    assert all(len(default_tokenizer.decode([i])) == 1 for i in default_tokenizer.encode("12345"))


def test_token_bytes_rebuild_multibyte_text(default_tokenizer: Tokenizer) -> None:
    text = "naïve 你好 🎉 <|im_end|>"
    ids = default_tokenizer.encode(text)
    assert b"".join(default_tokenizer.token_bytes(i) for i in ids).decode() == text
    assert any(len(default_tokenizer.token_bytes(i)) < 4 and i > 17 for i in ids)


def test_gguf_metadata_matches_gguf_package(tmp_path) -> None:
    path = str(tmp_path / "kv.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("a.u32", 7)
    writer.add_int64("a.i64", -(1 << 40))
    writer.add_float32("a.f32", 0.5)
    writer.add_float64("a.f64", 1e-300)
    writer.add_bool("a.bool", True)
    writer.add_string("a.str", "héllo")
    writer.add_array("a.ints", [1, 2, 3])
    writer.add_array("a.strs", ["x", "", "你好"])
    writer.add_array("a.nested", [[1, 2], [3]])  # gguf-py flattens these: checked apart
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(path).all_metadata()
    assert ours.pop("a.nested") == [[1, 2], [3]]
    reader = gguf.GGUFReader(path)
    fields = {
        k: f for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "a.nested"
    }
    assert list(ours) == list(fields)
    for key, field in fields.items():
        assert ours[key] == field.contents(), key
    header = GGUFFile(path)
    assert header.array_lengths == {"a.ints": 3, "a.strs": 3, "a.nested": 2}
    assert "a.strs" not in header.metadata and header.array("a.strs") == ["x", "", "你好"]
    meta = GGUFFile(default_model_path()).all_metadata()
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"GGML" + bytes(20), "bad magic"),
        (b"GGUF" + (9).to_bytes(4, "little") + bytes(16), "unsupported GGUF version 9"),
        (b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + b"\x01", "truncated"),
    ],
)
def test_gguf_reader_names_a_bad_file(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        GGUFFile(str(path))


def test_gguf_tokenizer_needs_neither_numpy_nor_gguf_py() -> None:
    # The API server builds its tokenizer from the header alone: no numpy, no gguf-py import.
    check = (
        "import sys\n"
        "from shoal.processing.tokenizer import Tokenizer\n"
        "Tokenizer.from_model(None)\n"
        "print(sorted(m for m in ('numpy', 'gguf', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_chat_template_renders_smollm_format(default_tokenizer: Tokenizer) -> None:
    text = default_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert no_prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert no_prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


def test_chat_content_parts_are_joined(default_tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = default_tokenizer.apply_chat_template([{"role": "user", "content": parts}])
    assert "user\na\nb<|im_end|>" in text


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", r"^messages: must be a list"),
        ([], r"^messages: must not be empty"),
        (["hi"], r"^messages\[0\]: must be a mapping"),
        ([{"content": "hi"}], r"^messages\[0\]\.role: must be a non-empty string"),
        ([{"role": "wizard", "content": "hi"}], r"^messages\[0\]\.role: must be one of"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            r"^messages\[1\]\.content: must be a string",
        ),
        ([{"role": "user", "content": [{"type": "image_url"}]}], r"^messages\[0\]\.content\[0\]"),
    ],
)
def test_bad_messages_raise_value_error_naming_the_field(
    default_tokenizer: Tokenizer, messages: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        default_tokenizer.apply_chat_template(messages)


def test_template_errors_and_sandbox(default_tokenizer: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="chat_template: nope"):
        default_tokenizer.apply_chat_template(msgs, chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="^chat_template"):
        default_tokenizer.apply_chat_template(msgs, chat_template="{% for %}")
    # The sandbox refuses attribute access that could escape it.
    with pytest.raises(Exception, match="unsafe|not safely"):
        default_tokenizer.apply_chat_template(
            msgs, chat_template="{{ messages.__class__.__subclasses__() }}"
        )


def test_save_pretrained_round_trip(default_tokenizer: Tokenizer, tmp_path) -> None:
    default_tokenizer.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == default_tokenizer.chat_template
    assert config["eos_token"] == "<|im_end|>"
    again = Tokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == default_tokenizer.encode(text)
    assert again.eos_token_ids == [2] and again.all_special_ids == default_tokenizer.all_special_ids
    assert again.apply_chat_template(
        [{"role": "user", "content": "q"}]
    ) == default_tokenizer.apply_chat_template([{"role": "user", "content": "q"}])


def test_hf_directory_eos_from_generation_config(default_tokenizer: Tokenizer, tmp_path) -> None:
    default_tokenizer.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_pretrained(str(tmp_path)).eos_token_ids == [0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_model(str(tmp_path))
    assert tok.eos_token_ids == [2, 0] and tok.eos_token_id == 2


def test_hf_directory_add_bos_token_and_template_file(
    default_tokenizer: Tokenizer, tmp_path
) -> None:
    default_tokenizer.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("hi")[0] == tok.bos_token_id == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


def test_missing_tokenizer_and_template(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Tokenizer.from_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def _write_gguf(path: str, model: str = "gpt2", pre: str = "smollm") -> None:
    """A weightless GGUF: the 256 byte-level symbols, two merges, one control and one
    user-defined token."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<eos>", *symbols, "he", "hel", "<think>"]
    types = [3] + [1] * (len(symbols) + 2) + [4]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e", "he l"])
    writer.add_eos_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_small_gguf_tokenizer(tmp_path) -> None:
    path = str(tmp_path / "t.gguf")
    _write_gguf(path)
    tok = Tokenizer.from_model(path)
    hel, think, eos = tok.backend.token_to_id("hel"), tok.backend.token_to_id("<think>"), 0
    assert tok.encode("hello<think><eos>")[:1] == [hel]
    assert tok.encode("hello<think><eos>")[-2:] == [think, eos]
    assert tok.all_special_ids == [eos] and tok.eos_token_id == eos
    # User-defined tokens are text: kept when special tokens are skipped.
    assert tok.decode(tok.encode("hel<think><eos>")) == "hel<think>"
    assert tok.apply_chat_template([{"role": "user", "content": "c"}]) == "c"


def test_unsupported_gguf_tokenizer_model(tmp_path) -> None:
    path = str(tmp_path / "spm.gguf")
    _write_gguf(path, model="llama")
    with pytest.raises(ValueError, match="^tokenizer: .*'llama'"):
        Tokenizer.from_gguf(path)
    with open(os.path.join(tmp_path, "bad.gguf"), "wb") as f:
        f.write(b"NOPE" + b"\0" * 32)
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(str(tmp_path / "bad.gguf"))
