"""Prometheus `process_*` metrics of every shoal process on this machine (the run's launcher and children).

prometheus_client's process collector covers the process that answers the scrape; a shoal
run is several processes, and any API server answers /metrics. So each sample here carries a
`process` label (`launcher`, `ApiServer_0`, `EngineCore_1`, `DPCoordinator`, ...) and the
set is found from the answering server's parent, the launcher: its children whose title is
`shoal::<name>`. Engines on other machines are not seen.
"""

from __future__ import annotations

import math
import os
import resource

import psutil

_FAMILIES = (
    ("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("process_start_time_seconds", "gauge", "Start time of the process since the epoch."),
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
)


def _shoal_processes() -> list[tuple[str, psutil.Process]]:
    """(role, process) of the launcher and its shoal children; this process alone when its
    parent is not a shoal launcher (a server started on its own, in tests)."""
    me = psutil.Process()
    found: list[tuple[str, psutil.Process]] = []
    parent = None
    try:
        parent = me.parent()
        children = parent.children() if parent is not None else []
        for child in children:
            title = " ".join(child.cmdline())
            if title.startswith("shoal::"):
                found.append((title.removeprefix("shoal::").split()[0], child))
    except psutil.Error:
        pass  # the launcher exited meanwhile: this process alone
    if not found:
        return [(_role_of(me), me)]
    assert parent is not None
    return [("launcher", parent), *sorted(found, key=lambda item: item[0])]


def _role_of(process: psutil.Process) -> str:
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return str(process.pid)
    return title.removeprefix("shoal::").split()[0] if title.startswith("shoal::") else "self"


def _figures(process: psutil.Process) -> tuple[float, ...] | None:
    try:
        with process.oneshot():
            cpu = process.cpu_times()
            memory = process.memory_info()
            started = process.create_time()
            fds = process.num_fds()
    except psutil.Error:
        return None  # it exited meanwhile
    if process.pid == os.getpid():
        max_fds = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    else:
        try:
            max_fds = float(process.rlimit(psutil.RLIMIT_NOFILE)[0])
        except (psutil.Error, AttributeError):
            max_fds = float("nan")
    return (cpu.user + cpu.system, memory.rss, memory.vms, started, fds, max_fds)


def render_process_metrics() -> str:
    """The `process_*` families, one sample per shoal process (label `process`)."""
    rows = [(role, _figures(p)) for role, p in _shoal_processes()]
    lines: list[str] = []
    for j, (name, kind, help_text) in enumerate(_FAMILIES):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for role, figures in rows:
            if figures is not None and math.isfinite(figures[j]):
                lines.append(f'{name}{{process="{role}"}} {figures[j]!r}')
    return "\n".join(lines) + "\n"
