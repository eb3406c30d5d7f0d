"""The engine's OpenMP wait policy (shoal/openmp_policy.py): which models spin, and that the
choice reaches the environment only before torch is imported and never over the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import TINY_LLAMA_CONFIG

from shoal.model.arch import arch_from_hf_config, load_arch_config
from shoal.openmp_policy import (
    ENGINE_SPIN_COUNT,
    FRONTEND_BUSY_TOKENS_PER_S,
    engine_spin_count,
    flop_per_token,
)

# The default model's shape (SmolLM2-135M) as a config.json: the policy reads only the shape.
SMOLLM2_CONFIG = {
    **TINY_LLAMA_CONFIG,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def test_flop_per_token_counts_layers_and_head() -> None:
    arch = load_arch_config(None)  # the default model, from its GGUF header
    # 134.5M weights in its linears and tied LM head (the loader's count, embeddings once).
    assert flop_per_token(arch) == 2 * 134_479_872
    assert flop_per_token(arch_from_hf_config(SMOLLM2_CONFIG)) == flop_per_token(arch)


def test_default_model_spins_tiny_model_sleeps() -> None:
    big = arch_from_hf_config(SMOLLM2_CONFIG)
    tiny = arch_from_hf_config(TINY_LLAMA_CONFIG)
    assert engine_spin_count(big, "cpu", 2) == ENGINE_SPIN_COUNT
    assert engine_spin_count(big, "auto", 2) == ENGINE_SPIN_COUNT
    # The tiny model outruns the API servers: they need the cores, the engine must not spin.
    assert engine_spin_count(tiny, "cpu", 2) is None
    assert engine_spin_count(big, "cuda", 2) is None
    # Enough cores make even the default model fast enough to keep the API servers busy.
    cores = 1
    while engine_spin_count(big, "cpu", cores) is not None:
        cores += 1
    assert cores * 1e11 / flop_per_token(big) >= FRONTEND_BUSY_TOKENS_PER_S
    # Data-parallel engines split the cores, and all of them stream through the API servers:
    # the line is the same total rate.
    assert engine_spin_count(big, "cpu", cores, data_parallel_size=2) is None
    assert engine_spin_count(big, "cpu", cores - 1, data_parallel_size=2) == ENGINE_SPIN_COUNT


def _run(code: str, env_updates: dict[str, str], tmp_path) -> dict:
    """Run `code` in a fresh interpreter (no torch imported yet) with OMP_WAIT_POLICY and
    GOMP_SPINCOUNT removed from its environment, then `env_updates` applied; `code` prints
    one JSON line, returned."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_updates)
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_CONFIGURE = """
import json, os
from shoal.config import ModelConfig, ShoalConfig
from shoal.openmp_policy import configure_engine
set_by = configure_engine(ShoalConfig(model=ModelConfig(model={model!r})))
import shoal.worker  # what EngineCore imports next: must keep the engine's choice
import torch
print(json.dumps({{"set": set_by, "policy": os.environ.get("OMP_WAIT_POLICY"),
                  "spin": os.environ.get("GOMP_SPINCOUNT"), "torch": torch.__version__}}))
"""


def _model_dir(tmp_path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SMOLLM2_CONFIG, {"set": f"GOMP_SPINCOUNT={ENGINE_SPIN_COUNT}", "policy": None,
                          "spin": str(ENGINE_SPIN_COUNT)}),
        (TINY_LLAMA_CONFIG, {"set": "OMP_WAIT_POLICY=PASSIVE", "policy": "PASSIVE",
                             "spin": None}),
    ],
)  # fmt: skip
def test_configure_engine_sets_environment_before_torch(tmp_path, config, expected) -> None:
    model = _model_dir(tmp_path, "model", config)
    got = _run(_CONFIGURE.format(model=model), {}, tmp_path)
    assert {k: got[k] for k in expected} == expected


def test_user_choice_wins(tmp_path) -> None:
    model = _model_dir(tmp_path, "model", SMOLLM2_CONFIG)
    got = _run(_CONFIGURE.format(model=model), {"OMP_WAIT_POLICY": "ACTIVE"}, tmp_path)
    assert (got["set"], got["policy"], got["spin"]) == (None, "ACTIVE", None)
    got = _run(_CONFIGURE.format(model=model), {"GOMP_SPINCOUNT": "7"}, tmp_path)
    assert (got["set"], got["policy"], got["spin"]) == (None, None, "7")


def test_nothing_is_set_once_torch_is_imported(tmp_path) -> None:
    model = _model_dir(tmp_path, "model", SMOLLM2_CONFIG)
    code = "import torch\n" + _CONFIGURE.format(model=model)
    got = _run(code, {}, tmp_path)
    assert (got["set"], got["policy"], got["spin"]) == (None, None, None)


def test_unreadable_model_sleeps(tmp_path) -> None:
    got = _run(_CONFIGURE.format(model=str(tmp_path / "missing")), {}, tmp_path)
    assert (got["set"], got["policy"]) == ("OMP_WAIT_POLICY=PASSIVE", "PASSIVE")
