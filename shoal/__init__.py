"""shoal: a multi-process LLM inference server.

`shoal.LLM` and `shoal.SamplingParams` are the offline API. Importing `shoal` does not import
torch (API-server processes must stay torch-free); `LLM` is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shoal.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from shoal.entrypoints.llm import LLM

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from shoal.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
