"""Engine entry points with an injected fault, for the engine-process tests (spawn targets)."""

from __future__ import annotations

from typing import Any

from shoal.engine.manager import run_engine_core


def run_engine_core_failing_on_boom(*args: Any) -> None:
    """`run_engine_core`, except that a step holding a request whose id starts with "boom"
    raises: the stand-in for a fatal model or scheduler error."""
    from shoal.engine.core import EngineCore

    real_step = EngineCore.step

    def step(self: EngineCore) -> Any:
        if any(rid.startswith("boom") for rid in self.scheduler.requests):
            raise RuntimeError("injected fatal error")
        return real_step(self)

    EngineCore.step = step  # type: ignore[method-assign]
    run_engine_core(*args)


def exit_with_code_3() -> None:
    """A child that dies at once (stands in for an API server failing during start-up)."""
    raise SystemExit(3)


def run_engine_core_hanging_on_hang(*args: Any) -> None:
    """`run_engine_core`, except that a step holding a request whose id contains "hang" never
    returns (the stand-in for a wedged kernel or a deadlock); SIGKILL ends it."""
    import time

    from shoal.engine.core import EngineCore

    real_step = EngineCore.step

    def step(self: EngineCore) -> Any:
        while any("hang" in rid for rid in self.scheduler.requests):
            time.sleep(0.1)
        return real_step(self)

    EngineCore.step = step  # type: ignore[method-assign]
    run_engine_core(*args)
