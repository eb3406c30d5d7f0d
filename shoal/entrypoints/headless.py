"""`run_headless`: `shoal serve --headless`, a host that runs engines only. It joins the front end
at --data-parallel-address:--data-parallel-rpc-port (`FrontEndLink`), starts its
--data-parallel-size-local engines (indices --data-parallel-start-rank..), hands them the API
servers' TCP addresses, reports READY and watches both its engines and the front end.

Exit 0 when the front end says stop or on SIGINT / SIGTERM; 1 when the front end is
unreachable or goes away, refuses this host, or one of the engines dies (the front end is
told which, and its API servers get the dead notice).
"""

from __future__ import annotations

import socket
from typing import Any

from shoal.config import ServerConfig, ShoalConfig
from shoal.engine.headless_link import FrontEndLink
from shoal.engine.manager import CoreEngineProcManager
from shoal.entrypoints.launcher import ShutdownRequested, _SignalState
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.protocol import HeadlessHello
from shoal.runtime.addresses import get_tcp_uri, remove_ipc_run_dir
from shoal.runtime.monitor import wait_for_completion_or_failure
from shoal.runtime.restart import EngineRestartPolicy

logger = init_logger(__name__)


class _NoApiServers:
    processes: list[Any] = []


def run_headless(config: ShoalConfig, server: ServerConfig) -> int:
    """Run this host's engines for the front end until it stops them (see module doc)."""
    resolve_model(config.model.model)  # fail before starting anything
    scale_out = server.scale_out
    start = scale_out.data_parallel_start_rank
    num_local = scale_out.local_engines(server.data_parallel_size)
    address = scale_out.data_parallel_address or server.host
    endpoint = get_tcp_uri(address, scale_out.data_parallel_rpc_port)
    _SignalState.install()
    link = FrontEndLink(endpoint, on_stop=_SignalState.request_stop)
    engines: CoreEngineProcManager | None = None
    try:
        logger.info(
            "headless: engines %d..%d of %d join the front end at %s",
            start,
            start + num_local - 1,
            server.data_parallel_size,
            endpoint,
        )
        hello = HeadlessHello(start, num_local, server.data_parallel_size, socket.gethostname())
        welcome = link.join(hello, server.ready_timeout_s)
        engines = CoreEngineProcManager(
            config,
            num_local,
            coordinator_address=welcome.coordinator_address,
            drain_timeout_s=server.shutdown_timeout_s,
            ready_timeout_s=server.ready_timeout_s,
            stall_exit_s=EngineRestartPolicy(enabled=False).stall_exit_s(server.stall_timeout_s),
            start_index=start,
        )
        engines.send_addresses(welcome.input_addresses, welcome.output_addresses)
        link.report_ready(engines.wait_for_ready(server.ready_timeout_s))
        _SignalState.serving = True
        logger.info("headless engines are ready and serve the front end at %s", endpoint)
        wait_for_completion_or_failure(
            _NoApiServers(),
            engines,
            stop_sentinel=_SignalState.stop_fd,
            engine_monitors=[link],
        )
        return 0
    except ShutdownRequested:
        logger.info("shutting down during start-up")
        return 0
    except RuntimeError as e:
        logger.error("%s", e)
        if engines is not None:
            engines.announce_failed_engines()
        link.report_dead(str(e))
        return 1
    finally:
        _SignalState.shutting_down = True
        if engines is not None:
            engines.shutdown(server.shutdown_timeout_s + 2.0)
        link.close()
        remove_ipc_run_dir()
        _SignalState.uninstall()
        logger.info("headless host stopped")
