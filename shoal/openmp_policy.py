"""How an engine's OpenMP threads wait between parallel regions (no torch here).

torch's OpenMP runtime on Linux (libgomp) reads its wait policy once, when torch is first
imported. A thread that has done its share of a parallel op either polls for the next one
(spins) or sleeps on a futex at once (`OMP_WAIT_POLICY=PASSIVE`).

- Sleeping costs a wake-up per parallel op: a decode step of the default model runs ~300 of
  them (every layer's linears, norms, attention), and on this 2-vCPU VM each wake of a
  sleeping thread cost ~7-9 us, more when its vCPU had gone idle. Spinning briefly made the
  served default model ~10% faster at c=1 and c=16 (docs/engine-runner.md, "CPU threads").
- Spinning is a disaster when the engine's cores are shared: a thread polls while the peer it
  waits for is descheduled. libgomp's default (300,000 polls, ~8 ms here) made single ops
  10-100x slower on 2 busy cores, and it cost the tiny test model 13% at c=64, where the API
  server needs a core as much as the engine does.

So an engine spins briefly (`ENGINE_SPIN_COUNT` polls, ~0.06 ms here: enough to bridge the
gaps between the ops of one step, and a bounded waste when a peer is descheduled) when its
own steps are the bottleneck, and sleeps at once when the API servers are expected to be
busy: when the model is small enough for the cores to produce more than
`FRONTEND_BUSY_TOKENS_PER_S` tokens per second (the same line `ModelRunner` uses to give the
API servers a core back). A user's own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` always wins.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.config import ShoalConfig
    from shoal.model.arch import ArchConfig

# libgomp polls (each a `pause`, ~28 ns on this AMD EPYC vCPU, up to ~40 ns on recent Intel).
ENGINE_SPIN_COUNT = 2000

# The engine's output rate above which the API servers are busy (~50-150 us of CPU each per
# streamed token, docs/performance.md): there a core kept spinning is a core they lack.
FRONTEND_BUSY_TOKENS_PER_S = 2000.0

# A rough float32 matmul rate of one core of this machine class (55-80 GFLOP/s measured at
# the model's shapes, ~2x that for int8): only for telling a 100M-parameter model from a toy.
CPU_FLOP_PER_S_PER_CORE = 1e11

_USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _settled() -> bool:
    """True when the policy can no longer be chosen here: torch (and with it libgomp) is
    imported, or the user set it."""
    return "torch" in sys.modules or any(v in os.environ for v in _USER_VARIABLES)


def flop_per_token(arch: ArchConfig) -> int:
    """Matmul FLOPs of one token through the layers and the LM head (2 per weight)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.intermediate_size
    return 2 * (arch.num_layers * per_layer + arch.vocab_size * h)


def engine_spin_count(
    arch: ArchConfig, device: str, cores: int, data_parallel_size: int = 1
) -> int | None:
    """GOMP_SPINCOUNT for one engine of this model, or None to sleep at once (PASSIVE):
    spin only on CPU and only when the engine cannot outrun the API servers (its cores'
    rough rate over the model's FLOPs per token is under FRONTEND_BUSY_TOKENS_PER_S)."""
    if device not in ("cpu", "auto"):
        return None
    engine_cores = max(1, cores // max(1, data_parallel_size))
    tokens_per_s = engine_cores * CPU_FLOP_PER_S_PER_CORE / max(1, flop_per_token(arch))
    busy_share = FRONTEND_BUSY_TOKENS_PER_S / max(1, data_parallel_size)
    return ENGINE_SPIN_COUNT if tokens_per_s < busy_share else None


def set_wait_policy(spin_count: int | None) -> str | None:
    """Set the environment libgomp reads when torch is imported: `GOMP_SPINCOUNT=spin_count`,
    or `OMP_WAIT_POLICY=PASSIVE` for None. Does nothing, and returns None, once torch is
    imported (too late) or when the user set either variable; else returns what it set."""
    if _settled():
        return None
    if spin_count is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "OMP_WAIT_POLICY=PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = str(int(spin_count))
    return f"GOMP_SPINCOUNT={int(spin_count)}"


def configure_engine(config: ShoalConfig) -> str | None:
    """`set_wait_policy` for an engine of `config`, before it imports torch. A model that
    cannot be read here gets PASSIVE (loading it will report the error)."""
    if _settled():  # before reading the model's header for nothing
        return None
    try:
        from shoal.model.arch import load_arch_config

        arch = load_arch_config(config.model.model)
    except (OSError, ValueError, KeyError):
        return set_wait_policy(None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spin = engine_spin_count(
        arch, config.model.device, cores or 1, config.parallel.data_parallel_size
    )
    return set_wait_policy(spin)
