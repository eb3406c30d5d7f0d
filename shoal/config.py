"""Frozen configuration dataclasses, one per concern, plus the aggregate `ShoalConfig` (what
every engine runs with) and `ServerConfig` (what the `shoal serve` launcher and its API
servers run with).

Validation lives in `__post_init__` and raises `ValueError` naming the CLI flag, so the CLI,
the offline `LLM` and the server report bad settings the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shoal import envs

DTYPES = ("float32", "bfloat16", "float16", "auto")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("cpu", "cuda", "auto")
# Weight quantizations applied at load (None = weights kept in `dtype`).
QUANTIZATIONS = ("int8", "gguf")
# `--quantization` values: "auto" (the default) is resolved by each engine when it loads the
# model (shoal/model/mode.py: gguf for a GGUF file of 4-bit linears where the native kernels
# load, else none); "none" = weights kept in `dtype`, the exact path.
QUANTIZATION_CHOICES = ("auto", "none", *QUANTIZATIONS)
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# What serves HTTP: the Python API servers, or the native `shoal-frontend` binary
# (docs/native-frontend.md).
FRONTENDS = ("python", "rust")
# KV cache storage: "auto" = the model's dtype, except float16 for float32 models with quantized
# weights (see `kv_cache_torch_dtype`); "float16" halves the bytes attention reads.
KV_CACHE_DTYPES = ("auto", "float32", "float16")


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    # Path to a Hugging Face directory or a .gguf file; None = the embedded default model.
    model: str | None = None
    # Tokenizer source when it differs from `model` (a directory or .gguf file).
    tokenizer: str | None = None
    dtype: str = "float32"
    load_format: str = "auto"
    # None = the model's own context length (max_position_embeddings).
    max_model_len: int | None = None
    device: str = "cpu"
    seed: int = 0
    # The name clients use in the `model` field; None = derived from the model path.
    served_model_name: str | None = None
    # "int8": every Linear of the layers and the LM head as int8 (per-output-channel weight
    # scales, per-token activation scales; CPU float32 only). "gguf": a GGUF model's 4-bit
    # Linear weights kept as its 4-bit blocks (the LM head int8; CPU float32 only).
    # None (or "none", stored as None) = unquantized, the exact path. "auto" = chosen by the
    # engine at load time (shoal.model.mode.resolve_mode): "gguf" where it qualifies, else None.
    quantization: str | None = "auto"

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "--dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization == "none":
            object.__setattr__(self, "quantization", None)
        _check(
            self.quantization is None or self.quantization in QUANTIZATION_CHOICES,
            "--quantization",
            f"must be one of {QUANTIZATION_CHOICES} or None, got {self.quantization!r}",
        )
        _check(
            self.quantization in (None, "auto")
            or (self.dtype in ("float32", "auto") and self.device in ("cpu", "auto")),
            "--quantization",
            f"{self.quantization} needs --dtype float32 and --device cpu",
        )
        _check(
            self.load_format in LOAD_FORMATS,
            "--load-format",
            f"must be one of {LOAD_FORMATS}, got {self.load_format!r}",
        )
        _check(self.device in DEVICES, "--device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.max_model_len is not None:
            _check(self.max_model_len > 0, "--max-model-len", "must be positive")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory given to the KV cache; the number of blocks follows from it.
    kv_cache_memory_bytes: int = 1 << 30
    # Exact number of KV blocks (overrides kv_cache_memory_bytes; tests use it to force
    # preemption).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # "auto", "float32" or "float16" (keys and values rounded to half precision when written;
    # attention still computes in the model's dtype). "auto" is the model's dtype, except
    # float16 when a float32 model's weights are quantized (`--quantization int8` or `gguf`):
    # docs/engine-runner.md, "KV cache dtype".
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "--kv-cache-dtype",
            f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
        )
        _check(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "--block-size",
            "must be a positive power of two",
        )
        _check(self.kv_cache_memory_bytes > 0, "--kv-cache-memory-bytes", "must be positive")
        if self.num_blocks is not None:
            _check(self.num_blocks > 0, "--num-blocks", "must be positive")


# The token budget of a step when none is given, by device. vLLM's 2048 suits a GPU, whose
# 2048-token prefill takes tens of milliseconds; on the 2-core CPU it takes ~1.5 s, during which
# every running request waits for its next token and every prompt of the wave waits for its
# first: at 16 concurrent 128-token requests TTFT p50 was 1.4-1.6 s with 2048 and 0.65-0.7 s
# with 512, at the same throughput (docs/performance.md, "Token budget").
DEFAULT_TOKEN_BUDGET = {"cpu": 512, "cuda": 2048}


@dataclass(frozen=True)
class SchedulerConfig:
    # Token budget of one step (prefill chunks + decode tokens); None: by device
    # (DEFAULT_TOKEN_BUDGET), see `token_budget`.
    max_num_batched_tokens: int | None = None
    # Cap on running sequences.
    max_num_seqs: int = 128
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
            "--max-num-batched-tokens",
            "must be positive",
        )
        _check(self.max_num_seqs > 0, "--max-num-seqs", "must be positive")

    def token_budget(self, device_type: str, max_model_len: int) -> int:
        """The budget this config means on `device_type` ("cpu", "cuda"): the one given, else
        the device's default, raised to `max_model_len` when prompts cannot be chunked."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        budget = DEFAULT_TOKEN_BUDGET.get(device_type, DEFAULT_TOKEN_BUDGET["cuda"])
        return budget if self.enable_chunked_prefill else max(budget, max_model_len)

    def resolved(self, device_type: str, max_model_len: int) -> SchedulerConfig:
        """This config with `max_num_batched_tokens` set (see `token_budget`)."""
        return replace(self, max_num_batched_tokens=self.token_budget(device_type, max_model_len))


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = 1
    api_server_count: int = 1

    def __post_init__(self) -> None:
        _check(self.data_parallel_size >= 1, "--data-parallel-size", "must be at least 1")
        _check(self.api_server_count >= 0, "--api-server-count", "must be at least 0")


@dataclass(frozen=True)
class ShoalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Seconds between a served engine's one-line stats log (throughput, queues, KV usage,
    # prefix cache hits; shoal.engine.stats_log); 0 = none (--disable-log-stats). The
    # offline `LLM` drives its engine without the process loop, so it never logs them.
    log_stats_interval_s: float = 10.0


# --data-parallel-backend: "mp" = engine processes on this host (and --headless hosts), "ray" =
# every engine a Ray actor (shoal.engine.ray_engines). Ray's placement strategies.
DATA_PARALLEL_BACKENDS = ("mp", "ray")
RAY_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ScaleOutConfig:
    """Where the data-parallel engines run beyond this host (docs/scale-out.md)."""

    data_parallel_backend: str = "mp"
    # Engines this host runs (mp backend); None = all of --data-parallel-size. The rest are
    # --headless engines on other hosts that join over TCP.
    data_parallel_size_local: int | None = None
    # The first engine index this host runs (--headless hosts; the front end's is 0).
    data_parallel_start_rank: int = 0
    # The front end's address that engines on other hosts reach; None = --host (Ray: the
    # head node's IP as Ray sees it).
    data_parallel_address: str | None = None
    # The front end's TCP port where --headless hosts join.
    data_parallel_rpc_port: int = 29550
    # Run only engines (no API server) that join the front end at
    # --data-parallel-address:--data-parallel-rpc-port.
    headless: bool = False
    # The Ray cluster (`ray.init(address=...)`); None = $RAY_ADDRESS, else a local Ray
    # instance the launcher starts and stops.
    ray_address: str | None = None
    ray_placement_strategy: str = "PACK"
    ray_cpus_per_engine: float = 1.0
    # None = 1 on --device cuda, else 0.
    ray_gpus_per_engine: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.data_parallel_backend in DATA_PARALLEL_BACKENDS,
            "--data-parallel-backend",
            f"must be one of {DATA_PARALLEL_BACKENDS}, got {self.data_parallel_backend!r}",
        )
        _check(
            self.data_parallel_size_local is None or self.data_parallel_size_local >= 0,
            "--data-parallel-size-local",
            f"must be at least 0, got {self.data_parallel_size_local}",
        )
        _check(
            self.data_parallel_start_rank >= 0,
            "--data-parallel-start-rank",
            f"must be at least 0, got {self.data_parallel_start_rank}",
        )
        _check(
            1 <= self.data_parallel_rpc_port <= 65535,
            "--data-parallel-rpc-port",
            f"must be in [1, 65535], got {self.data_parallel_rpc_port}",
        )
        _check(
            self.ray_placement_strategy in RAY_PLACEMENT_STRATEGIES,
            "--ray-placement-strategy",
            f"must be one of {RAY_PLACEMENT_STRATEGIES}, got {self.ray_placement_strategy!r}",
        )
        _check(self.ray_cpus_per_engine > 0, "--ray-cpus-per-engine", "must be positive")
        _check(
            self.ray_gpus_per_engine is None or self.ray_gpus_per_engine >= 0,
            "--ray-gpus-per-engine",
            "must be non-negative",
        )
        _check(
            not (self.headless and self.data_parallel_backend == "ray"),
            "--headless",
            "runs engine processes of its own; it cannot be combined with "
            "--data-parallel-backend ray",
        )

    def check_ranks(self, data_parallel_size: int) -> None:
        """`ValueError` naming the flag when this host's engines fall outside 0..size-1."""
        local = self.local_engines(data_parallel_size)
        start = self.data_parallel_start_rank
        _check(
            start < data_parallel_size,
            "--data-parallel-start-rank",
            f"{start} is out of range for --data-parallel-size {data_parallel_size} "
            f"(engines 0..{data_parallel_size - 1})",
        )
        _check(
            start + local <= data_parallel_size,
            "--data-parallel-start-rank",
            f"engines {start}..{start + local - 1} of this host are out of range for "
            f"--data-parallel-size {data_parallel_size}",
        )
        _check(
            self.headless or start == 0,
            "--data-parallel-start-rank",
            "only --headless hosts start above 0 (the front end runs engines 0..K-1)",
        )
        _check(
            not self.headless or local >= 1,
            "--data-parallel-size-local",
            "a --headless host runs at least one engine",
        )

    def local_engines(self, data_parallel_size: int) -> int:
        """The number of engines this host runs itself (Ray: none are local processes)."""
        if self.data_parallel_backend == "ray":
            return 0
        if self.data_parallel_size_local is None:
            return data_parallel_size - self.data_parallel_start_rank
        return self.data_parallel_size_local


@dataclass(frozen=True)
class ServerConfig:
    """The settings of `shoal serve`'s launcher and API servers, built once from the flags
    (`shoal.entrypoints.serve_args.server_config_from_args`) and pickled to every API-server
    process; plain values only. The engines run with `ShoalConfig` instead."""

    # What is served; the same flags as ModelConfig's fields of these names: the API servers
    # load the tokenizer themselves and name the model in their answers.
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    # 0 = any free port (printed once ready).
    port: int = 8000
    api_server_count: int = 1
    data_parallel_size: int = 1
    # Seconds SIGINT / SIGTERM give in-flight requests to finish before they are aborted.
    shutdown_timeout_s: float = 5.0
    # Deadline of every engine's READY (at start and after a restart); None = the
    # environment's (SHOAL_ENGINE_READY_TIMEOUT_S): see `ready_timeout_s`.
    engine_ready_timeout_s: float | None = None
    # Busy engines send at least one message a second (a heartbeat between steps), so only a
    # step that runs this long looks hung: generous for a big prefill on a CPU. 0 = never.
    engine_stall_timeout_s: float = 120.0
    # Replace a dead engine instead of stopping the run (shoal.runtime.restart).
    restart_dead_engines: bool = False
    # Required as `Authorization: Bearer <api_key>` on /v1 routes; None = open.
    api_key: str | None = None
    # Generation requests in flight over all API servers before new ones get 503; None = no
    # limit.
    max_num_queued_requests: int | None = None
    max_request_body_bytes: int = 4 << 20
    # Tokens per streamed chunk (shoal.processing.output_processor).
    stream_interval: int = 1
    uvicorn_log_level: str = "warning"
    # Engines on other hosts: Ray actors or --headless hosts (docs/scale-out.md).
    scale_out: ScaleOutConfig = field(default_factory=ScaleOutConfig)
    # /v1/completions takes `prompt_embeds`, sent to the engines on a shared-memory tensor
    # queue (shoal.runtime.tensor_queue).
    enable_prompt_embeds: bool = False
    # CORS, with vLLM's defaults: any origin, method and header; no credentials.
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # A Jinja chat template (its text, or a file holding it) replacing the tokenizer's.
    chat_template: str | None = None
    # One INFO line per HTTP request from every API server.
    access_log: bool = False
    # tool_choice "auto": tool calls read out of free output by this parser
    # (shoal.processing.tool_parsers.TOOL_PARSERS); both or neither.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # One of FRONTENDS: "rust" runs one native process in place of the API servers.
    frontend: str = "python"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "--port", f"must be in [0, 65535], got {self.port}")
        _check(
            self.api_server_count >= 1,
            "--api-server-count",
            "must be at least 1 (engines without API servers: --headless), "
            f"got {self.api_server_count}",
        )
        _check(
            self.data_parallel_size >= 1,
            "--data-parallel-size",
            f"must be at least 1, got {self.data_parallel_size}",
        )
        _check(
            self.shutdown_timeout_s >= 0,
            "--shutdown-timeout",
            f"must be non-negative, got {self.shutdown_timeout_s}",
        )
        _check(
            self.engine_ready_timeout_s is None or self.engine_ready_timeout_s > 0,
            "--engine-ready-timeout",
            f"must be positive, got {self.engine_ready_timeout_s}",
        )
        _check(
            self.engine_stall_timeout_s >= 0,
            "--engine-stall-timeout",
            f"must be non-negative, got {self.engine_stall_timeout_s}",
        )
        _check(
            self.max_request_body_bytes >= 1,
            "--max-request-body-bytes",
            f"must be at least 1, got {self.max_request_body_bytes}",
        )
        _check(
            self.stream_interval >= 1,
            "--stream-interval",
            f"must be at least 1, got {self.stream_interval}",
        )
        _check(
            self.max_num_queued_requests is None or self.max_num_queued_requests >= 1,
            "--max-num-queued-requests",
            f"must be at least 1, got {self.max_num_queued_requests}",
        )
        _check(
            self.uvicorn_log_level in UVICORN_LOG_LEVELS,
            "--uvicorn-log-level",
            f"must be one of {UVICORN_LOG_LEVELS}, got {self.uvicorn_log_level!r}",
        )
        self.scale_out.check_ranks(self.data_parallel_size)
        _check(
            not self.enable_prompt_embeds
            or (
                self.scale_out.data_parallel_backend == "mp"
                and self.scale_out.local_engines(self.data_parallel_size) == self.data_parallel_size
            ),
            "--enable-prompt-embeds",
            "needs every engine on this host (tensors travel through shared memory)",
        )
        self._check_tool_flags()
        self._check_frontend()

    def _check_frontend(self) -> None:
        _check(
            self.frontend in FRONTENDS,
            "--frontend",
            f"must be one of {FRONTENDS}, got {self.frontend!r}",
        )
        if self.frontend != "rust" or self.scale_out.headless:  # a headless host has none
            return
        # The binary binds concrete engine addresses and cannot report a tcp://h:0 port
        # back, nor speak CURVE: v1 serves engines on this host only.
        _check(
            self.scale_out.data_parallel_backend == "mp"
            and self.scale_out.local_engines(self.data_parallel_size) == self.data_parallel_size,
            "--frontend",
            "rust serves engines on this host only (no --data-parallel-backend ray, "
            "no --data-parallel-size-local below --data-parallel-size); use --frontend python",
        )
        _check(
            not self.enable_prompt_embeds,
            "--frontend",
            "rust does not take --enable-prompt-embeds; use --frontend python",
        )

    def _check_tool_flags(self) -> None:
        from shoal.processing.tool_parsers import TOOL_PARSERS  # stdlib only

        parser = self.tool_call_parser
        _check(
            parser is None or parser in TOOL_PARSERS,
            "--tool-call-parser",
            f"must be one of {sorted(TOOL_PARSERS)}, got {parser!r}",
        )
        _check(
            not self.enable_auto_tool_choice or parser is not None,
            "--enable-auto-tool-choice",
            "needs --tool-call-parser",
        )

    @property
    def ready_timeout_s(self) -> float:
        """The engine READY deadline in effect: the flag's, else the environment's."""
        return self.engine_ready_timeout_s or envs.ENVS.engine_ready_timeout_s

    @property
    def stall_timeout_s(self) -> float | None:
        """The stall timeout in effect; None = engines are never declared hung."""
        return self.engine_stall_timeout_s or None
