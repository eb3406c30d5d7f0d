"""Logging with the process role in every line: `[EngineCore_0] INFO 12:00:01 shoal.core: ...`."""

from __future__ import annotations

import logging
import os
import sys

_role = "Launcher"
_configured = False


class _RoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.role = _role
        return super().format(record)


def set_process_role(role: str) -> None:
    """Name this process in every later log line (e.g. `ApiServer_1`, `EngineCore_0`)."""
    global _role
    _role = role


def get_process_role() -> str:
    return _role


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    from shoal.envs import ENVS

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RoleFormatter(
            "[%(role)s pid=%(process)d] %(levelname)s %(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    root = logging.getLogger("shoal")
    root.addHandler(handler)
    root.setLevel(os.environ.get("SHOAL_LOGGING_LEVEL", ENVS.logging_level))
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """The module's logger; every shoal logger shares the role-prefixed handler."""
    _configure()
    return logging.getLogger(name)
