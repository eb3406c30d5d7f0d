"""Offline end-to-end tests: shoal's `LLM` against Hugging Face transformers."""

from __future__ import annotations

import os
import sys

# `tests.helpers` resolves from the repository root however pytest was started.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
