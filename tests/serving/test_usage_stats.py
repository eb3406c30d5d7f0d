"""report_usage_stats: local JSON line, every opt-out honoured, never raises."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import envs
from shoal.config import CacheConfig, ModelConfig, ShoalConfig
from shoal.engine import usage_stats
from shoal.engine.usage_stats import STATS_FILE, report_usage_stats

CONFIG = ShoalConfig(
    model=ModelConfig(model="/secret/path/model", dtype="float32"), cache=CacheConfig(block_size=32)
)


@pytest.fixture
def config_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in (
        "SHOAL_NO_USAGE_STATS",
        "DO_NOT_TRACK",
        "SHOAL_DO_NOT_TRACK",
        "SHOAL_USAGE_STATS_SERVER",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOAL_CONFIG_ROOT", str(tmp_path))
    envs.refresh()
    yield tmp_path
    monkeypatch.undo()
    envs.refresh()


def _records(root: Path) -> list[dict]:
    path = root / STATS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_records_the_configuration_locally(config_root: Path) -> None:
    report_usage_stats(CONFIG)
    report_usage_stats(CONFIG, "LLM_CLASS")
    first, second = _records(config_root)
    assert first["usage_context"] == "ENGINE_CONTEXT" and second["usage_context"] == "LLM_CLASS"
    assert first["block_size"] == 32 and first["dtype"] == "float32"
    assert first["model_format"] == "hf"
    assert "/secret/path" not in (config_root / STATS_FILE).read_text()
    assert first["uuid"] != second["uuid"]


@pytest.mark.parametrize("env", ["SHOAL_NO_USAGE_STATS", "DO_NOT_TRACK", "SHOAL_DO_NOT_TRACK"])
def test_env_opt_outs(config_root: Path, monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv(env, "1")
    envs.refresh()
    report_usage_stats(CONFIG)
    assert _records(config_root) == []


def test_do_not_track_file(config_root: Path) -> None:
    (config_root / "do_not_track").touch()
    report_usage_stats(CONFIG)
    assert _records(config_root) == []


def test_never_raises(config_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The config root is a file: the record cannot be written, the caller never notices.
    blocker = config_root / "not-a-dir"
    blocker.touch()
    monkeypatch.setenv("SHOAL_CONFIG_ROOT", str(blocker))
    envs.refresh()
    report_usage_stats(CONFIG)
    report_usage_stats(object())  # type: ignore[arg-type]


def test_unknown_context_is_recorded_as_unknown(config_root: Path) -> None:
    report_usage_stats(CONFIG, "SOMETHING_ELSE")
    assert _records(config_root)[0]["usage_context"] == "UNKNOWN_CONTEXT"


def test_posts_only_to_the_configured_server(
    config_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[dict] = []
    got = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()
            got.set()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(
            "SHOAL_USAGE_STATS_SERVER", f"http://127.0.0.1:{server.server_address[1]}/usage"
        )
        envs.refresh()
        report_usage_stats(CONFIG)
        assert got.wait(10)
    finally:
        server.shutdown()
        server.server_close()
    assert received[0]["uuid"] == _records(config_root)[0]["uuid"]


def test_enabled_flag_follows_environment(
    config_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert usage_stats.is_usage_stats_enabled()
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    envs.refresh()
    assert not usage_stats.is_usage_stats_enabled()
