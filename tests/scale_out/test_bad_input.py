"""Bad scale-out input: one clear error each, within the start-up deadline, nothing left
running. (A Ray address with no cluster, and Ray missing: test_ray_engines.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.scale_out.ray_cluster import free_port
from tests.serving.conftest import TINY_FLAGS, start_serve

# Start-up deadline of these runs: a failure must come within it.
READY = ["--engine-ready-timeout", "4"]


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if " ERROR " in line]


def test_headless_host_with_an_unreachable_front_end(tiny_model_dir: str) -> None:
    port = free_port()  # nothing listens there
    flags = [
        "--headless", "--data-parallel-size", "2", "--data-parallel-size-local", "1",
        "--data-parallel-start-rank", "1", "--data-parallel-address", "127.0.0.1",
        "--data-parallel-rpc-port", str(port), *READY,
    ]  # fmt: skip
    server = start_serve([tiny_model_dir, *TINY_FLAGS, *flags], wait_ready=False)
    assert server.wait(60) == 1
    errors = _errors(server.lines)
    assert len(errors) == 1, server.log
    assert f"no shoal front end answered at tcp://127.0.0.1:{port} within 4.0s" in errors[0]
    assert "--data-parallel-address" in errors[0]
    assert "EngineCore" not in server.log  # nothing was started
    assert server.leftovers() == []


def test_front_end_address_that_is_not_this_hosts(tiny_model_dir: str) -> None:
    flags = [
        "--data-parallel-size", "2", "--data-parallel-size-local", "1",
        "--data-parallel-address", "192.0.2.254", *READY,
    ]  # fmt: skip
    server = start_serve([tiny_model_dir, *TINY_FLAGS, *flags], wait_ready=False)
    assert server.wait(60) == 1
    errors = _errors(server.lines)
    assert len(errors) == 1, server.log
    assert "--data-parallel-address 192.0.2.254: not an address of this host" in errors[0]
    assert server.leftovers() == []


def test_front_end_rpc_port_in_use(tiny_model_dir: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = [
            "--data-parallel-size", "2", "--data-parallel-size-local", "1",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port),
            *READY,
        ]  # fmt: skip
        server = start_serve([tiny_model_dir, *TINY_FLAGS, *flags], wait_ready=False)
        assert server.wait(60) == 1
    errors = _errors(server.lines)
    assert len(errors) == 1, server.log
    assert f"--data-parallel-rpc-port {port}: 127.0.0.1:{port} is already in use" in errors[0]
    assert server.leftovers() == []


def test_rank_out_of_range_is_a_flag_error(tiny_model_dir: str) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "shoal.entrypoints.cli", "serve", tiny_model_dir, "--headless",
            "--data-parallel-size", "2", "--data-parallel-size-local", "1",
            "--data-parallel-start-rank", "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "shoal serve: error: --data-parallel-start-rank: 2 is out of range for "
        "--data-parallel-size 2 (engines 0..1)"
    )


def test_front_end_refuses_a_host_whose_ranks_it_runs_itself(tiny_model_dir: str) -> None:
    port = free_port()
    front = start_serve(
        [
            tiny_model_dir, *TINY_FLAGS, "--data-parallel-size", "2",
            "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", str(port), *READY,
        ],
        wait_ready=False,
    )  # fmt: skip
    front.wait_for_log("waiting for --headless hosts to join", 60)
    host = start_serve(
        [
            tiny_model_dir, *TINY_FLAGS, "--headless", "--data-parallel-size", "2",
            "--data-parallel-size-local", "1", "--data-parallel-start-rank", "0",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port),
            *READY,
        ],
        wait_ready=False,
    )  # fmt: skip
    assert host.wait(60) == 1
    errors = _errors(host.lines)
    assert len(errors) == 1, host.log
    assert "refused this host: its engine 0 (--data-parallel-start-rank 0)" in errors[0]
    # The front end, with nobody for engine 1, gives up at its deadline, naming it (the
    # launcher or an API server, whichever deadline passes first).
    assert front.wait(60) == 1
    assert (
        "waiting for engine(s) 1 to join from a --headless host" in front.log
        or "waiting for engine(s) [1] to report ready" in front.log
    ), front.log
    assert front.leftovers() == [] and host.leftovers() == []


def test_headless_host_with_another_secret(tiny_model_dir: str) -> None:
    port = free_port()
    common = [
        tiny_model_dir, *TINY_FLAGS, "--data-parallel-size", "2",
        "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port), *READY,
    ]  # fmt: skip
    front = start_serve(
        [*common, "--data-parallel-size-local", "1"],
        wait_ready=False,
        env={"SHOAL_ENGINE_SECRET": "the-front-ends"},
    )
    front.wait_for_log("waiting for --headless hosts to join", 60)
    host = start_serve(
        [
            *common,
            "--headless",
            "--data-parallel-size-local",
            "1",
            "--data-parallel-start-rank",
            "1",
        ],
        wait_ready=False,
        env={"SHOAL_ENGINE_SECRET": "a-guess"},
    )
    assert host.wait(60) == 1
    errors = _errors(host.lines)
    assert len(errors) == 1, host.log
    assert "handshake failed: SHOAL_ENGINE_SECRET must be the same on both hosts" in errors[0]
    assert "EngineCore" not in host.log  # the host started nothing
    assert front.wait(60) == 1  # engine 1 never joined: named at the deadline
    assert front.leftovers() == [] and host.leftovers() == []
