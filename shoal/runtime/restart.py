"""`EngineRestartPolicy`: what the death of one engine means for the run (--restart-dead-engines).

One object answers the question in both processes that ask it:

* the launcher's `wait_for_completion_or_failure(..., restart_policy=)` asks `restart_or_fail`
  when an engine process exits: restart it now, or end the run (`RuntimeError`);
* each API server's `EngineClient` asks `restarts_engines`: a dead engine is only "down"
  until its replacement reports READY (fail its requests, keep serving on the others), or
  the client is dead for good.

The bound: one engine is restarted at most `max_restarts` times within `window_s` seconds
(SHOAL_MAX_ENGINE_RESTARTS, SHOAL_ENGINE_RESTART_WINDOW_S); a replacement must report READY
within `ready_timeout_s` and must not die before it does (a crash loop).
"""

from __future__ import annotations

import collections

from shoal import envs
from shoal.config import ServerConfig


class EngineRestartPolicy:
    """Whether dead engines are replaced, and how often one may be.

    `enabled` False is the default behaviour of `shoal serve`: any engine death ends the run
    (the launcher) and makes the client dead (the API servers). `max_restarts`, `window_s`
    and `ready_timeout_s` default to the environment's values. Launcher-side state: the
    restart times of each engine (the API servers only read `restarts_engines`)."""

    def __init__(
        self,
        max_restarts: int | None = None,
        window_s: float | None = None,
        *,
        enabled: bool = True,
        ready_timeout_s: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.max_restarts = envs.ENVS.max_engine_restarts if max_restarts is None else max_restarts
        self.window_s = envs.ENVS.engine_restart_window_s if window_s is None else window_s
        self.ready_timeout_s = ready_timeout_s or envs.ENVS.engine_ready_timeout_s
        # Engine index -> monotonic times of its restarts within the window.
        self._history: dict[int, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )

    @classmethod
    def for_server(cls, config: ServerConfig) -> EngineRestartPolicy:
        """The policy of `shoal serve`: on with --restart-dead-engines, bounded by the
        environment; a replacement gets the engines' READY deadline."""
        return cls(enabled=config.restart_dead_engines, ready_timeout_s=config.ready_timeout_s)

    @property
    def restarts_engines(self) -> bool:
        """A dead engine is replaced (True) or ends the run (False)."""
        return self.enabled

    def stall_exit_s(self, stall_timeout_s: float | None) -> float | None:
        """How long one step may run before the engine exits itself: with restarts a hung
        engine ends its own process so that it is replaced like a dead one; without them it
        stays (the API servers' watchdog declares it hung and the run fails)."""
        return stall_timeout_s if self.enabled else None

    def allow(self, engine_index: int, now: float) -> bool:
        """Whether engine `engine_index` may be restarted at monotonic time `now`; recorded
        as a restart if so."""
        if not self.enabled:
            return False
        history = self._history[engine_index]
        while history and now - history[0] > self.window_s:
            history.popleft()
        if len(history) >= self.max_restarts:
            return False
        history.append(now)
        return True

    def restarts(self, engine_index: int) -> int:
        """Restarts of engine `engine_index` within the window (as of the last `allow`)."""
        return len(self._history[engine_index])

    def restart_or_fail(self, engine_index: int, death: str, now: float) -> None:
        """The decision for engine `engine_index`, dead as `death` says ("Process
        EngineCore_0 (PID: 12) died with exit code -9"): return to restart it now (recorded),
        or raise `RuntimeError` naming it to end the run (restarts off, or the bound
        reached)."""
        if not self.enabled:
            raise RuntimeError(death)
        if not self.allow(engine_index, now):
            raise RuntimeError(
                f"{death}; not restarting it again: it was restarted "
                f"{self.restarts(engine_index)} time(s) in the last {self.window_s:g} s "
                "(SHOAL_MAX_ENGINE_RESTARTS)"
            )

    @staticmethod
    def crash_loop(proc_name: str, pid: int | None, code: int | None) -> RuntimeError:
        """The error ending the run when a replacement exits before it reported READY."""
        return RuntimeError(
            f"{proc_name} (pid {pid}) exited with code {code} after a restart, before it "
            "reported READY (crash loop?); see its log above"
        )

    def ready_timeout(self, proc_name: str) -> RuntimeError:
        """The error ending the run when a replacement is not READY within the deadline."""
        return RuntimeError(
            f"{proc_name} did not report READY within {self.ready_timeout_s:.1f}s of its "
            "restart; raise --engine-ready-timeout or SHOAL_ENGINE_READY_TIMEOUT_S"
        )
