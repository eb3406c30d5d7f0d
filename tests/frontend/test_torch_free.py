"""The front end stays torch-free: API-server processes import it and must not pay for torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import shoal.processing.chat_template, shoal.processing.detokenizer, shoal.processing.outputs
import shoal.processing.output_processor, shoal.processing.processor, shoal.processing.tokenizer
import shoal.entrypoints.llm, shoal.entrypoints.generate
from shoal.processing.tokenizer import Tokenizer
from shoal.processing.processor import InputProcessor
tok = Tokenizer.from_model(None)
InputProcessor(tok, 100).process("r", "hello")
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, heavy
"""


def test_front_end_imports_no_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
