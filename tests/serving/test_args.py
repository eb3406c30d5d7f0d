"""`shoal serve` flags: defaults from the config dataclasses, errors naming the flag."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from shoal.api.server import _server_config
from shoal.config import ServerConfig, ShoalConfig
from shoal.entrypoints.cli import main
from shoal.entrypoints.serve_args import (
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    config_from_args,
    make_serve_parser,
    server_config_from_args,
)


def _parse(*argv: str):
    return make_serve_parser().parse_args(list(argv))


def test_defaults_are_the_config_defaults() -> None:
    args = _parse()
    assert config_from_args(args) == ShoalConfig()
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert args.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT_S


def test_flags_reach_the_config() -> None:
    args = _parse(
        "/m",
        "--api-server-count",
        "2",
        "--data-parallel-size",
        "3",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "64",
        "--block-size",
        "8",
        "--num-blocks",
        "20",
        "--kv-cache-memory-bytes",
        "1000",
        "--no-enable-prefix-caching",
        "--load-format",
        "dummy",
        "--seed",
        "7",
        "--served-model-name",
        "x",
        "--tokenizer",
        "/t",
    )
    config = config_from_args(args)
    assert config.parallel.api_server_count == 2 and config.parallel.data_parallel_size == 3
    assert (config.model.model, config.model.dtype, config.model.max_model_len) == (
        "/m",
        "bfloat16",
        256,
    )
    assert (config.model.load_format, config.model.seed) == ("dummy", 7)
    assert (config.model.served_model_name, config.model.tokenizer) == ("x", "/t")
    assert config.model.quantization == "auto"  # engines resolve it (shoal/model/mode.py)
    assert config_from_args(_parse("--quantization", "int8")).model.quantization == "int8"
    assert config_from_args(_parse("--quantization", "none")).model.quantization is None
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (4, 64)
    assert (config.cache.block_size, config.cache.num_blocks) == (8, 20)
    assert config.cache.kv_cache_memory_bytes == 1000
    assert not config.cache.enable_prefix_caching


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--block-size", "12"], "--block-size"),
        (["--data-parallel-size", "0"], "--data-parallel-size"),
        (["--api-server-count", "0"], "--api-server-count"),
        (["--port", "70000"], "--port"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--engine-ready-timeout", "0"], "--engine-ready-timeout"),
        (["--stream-interval", "0"], "--stream-interval"),
        (["--quantization", "int8", "--dtype", "bfloat16"], "--quantization"),
    ],
)
def test_invalid_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        config_from_args(_parse(*argv))


def test_namespace_is_picklable() -> None:
    args = _parse("--api-key", "k")
    assert vars(pickle.loads(pickle.dumps(args))) == vars(args)


def test_server_config_defaults_are_the_flag_defaults() -> None:
    assert server_config_from_args(_parse()) == ServerConfig()


def test_server_flags_reach_the_server_config() -> None:
    args = _parse(
        "/m",
        "--tokenizer",
        "/t",
        "--served-model-name",
        "x",
        "--host",
        "::1",
        "--port",
        "0",
        "--api-server-count",
        "2",
        "--data-parallel-size",
        "3",
        "--shutdown-timeout",
        "1.5",
        "--engine-ready-timeout",
        "7",
        "--engine-stall-timeout",
        "0",
        "--restart-dead-engines",
        "--api-key",
        "k",
        "--max-num-queued-requests",
        "9",
        "--max-request-body-bytes",
        "100",
        "--stream-interval",
        "4",
        "--uvicorn-log-level",
        "info",
    )
    assert server_config_from_args(args) == ServerConfig(
        model="/m",
        tokenizer="/t",
        served_model_name="x",
        host="::1",
        port=0,
        api_server_count=2,
        data_parallel_size=3,
        shutdown_timeout_s=1.5,
        engine_ready_timeout_s=7.0,
        engine_stall_timeout_s=0.0,
        restart_dead_engines=True,
        api_key="k",
        max_num_queued_requests=9,
        max_request_body_bytes=100,
        stream_interval=4,
        uvicorn_log_level="info",
    )


def test_server_config_resolves_what_the_flags_leave_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shoal import envs

    monkeypatch.setenv("SHOAL_ENGINE_READY_TIMEOUT_S", "42")
    monkeypatch.setattr(envs, "ENVS", envs._read())
    config = ServerConfig(engine_stall_timeout_s=0.0)
    assert config.ready_timeout_s == 42.0 and config.stall_timeout_s is None
    config = ServerConfig(engine_ready_timeout_s=3.0, engine_stall_timeout_s=5.0)
    assert config.ready_timeout_s == 3.0 and config.stall_timeout_s == 5.0


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("port", -1, "--port"),
        ("api_server_count", 0, "--api-server-count"),
        ("engine_stall_timeout_s", -1.0, "--engine-stall-timeout"),
        ("max_num_queued_requests", 0, "--max-num-queued-requests"),
        ("uvicorn_log_level", "loud", "--uvicorn-log-level"),
    ],
)
def test_server_config_names_the_flag(field: str, value: object, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ServerConfig(**{field: value})  # type: ignore[arg-type]


def test_server_config_crosses_to_the_api_servers() -> None:
    """Pickled to every API-server process; the seed's namespace is converted there once."""
    config = server_config_from_args(_parse("--api-key", "k", "--restart-dead-engines"))
    assert pickle.loads(pickle.dumps(config)) == config
    assert _server_config(config) is config
    args = _parse("--api-key", "k", "--restart-dead-engines")
    assert _server_config(args) == config
    args.stream_interval = 0
    with pytest.raises(ValueError, match="--stream-interval"):
        _server_config(args)


def test_cli_reports_a_bad_flag_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--block-size", "3"])
    assert exc.value.code == 2
    assert "--block-size" in capsys.readouterr().err


def test_serve_help_does_not_import_torch() -> None:
    code = (
        "import sys; from shoal.entrypoints.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'shoal.entrypoints.launcher' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--data-parallel-size" in out.stdout
