"""`shoal top URL`: the dashboard's view of a running server in a terminal (curses), refreshed in place.

It reads the same JSON as the `/dashboard` page (`GET /dashboard/data`, shoal.api.dashboard)
on a background thread, once per `--interval`, and redraws; `q` or Ctrl-C quits. The layout
fits 80x24; a smaller terminal shows what fits.
"""

from __future__ import annotations

import argparse
import curses
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

_FETCH_TIMEOUT_S = 5.0
_MAX_ENGINE_ROWS = 8


def register(subparsers: Any) -> None:
    """Add `top` to the `shoal` command's subparsers."""
    parser = subparsers.add_parser(
        "top",
        help="watch a running server's engines in the terminal",
        description="A live view of a running shoal server (its engines, latencies, API "
        "servers and recent errors), refreshed in place; q or Ctrl-C quits.",
    )
    parser.add_argument(
        "url", nargs="?", default="http://127.0.0.1:8000", help="the server (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key", default=None, help="the server's --api-key, when it was started with one"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)"
    )
    parser.set_defaults(func=run_top)


def run_top(args: argparse.Namespace) -> int:
    """Run the view until `q` or Ctrl-C; `ValueError` naming the flag for bad arguments."""
    if not args.url.startswith(("http://", "https://")):
        raise ValueError(f"url: must start with http:// or https://, got {args.url!r}")
    if not args.interval > 0:
        raise ValueError(f"--interval: must be positive, got {args.interval}")
    fetcher = _Fetcher(args.url.rstrip("/"), args.api_key, args.interval)
    fetcher.start()
    try:
        curses.wrapper(_loop, fetcher)
    except KeyboardInterrupt:
        pass
    finally:
        fetcher.stop()
    return 0


class _Fetcher:
    """Polls `/dashboard/data` on a thread; `latest()` is the newest view and the last error."""

    def __init__(self, url: str, api_key: str | None, interval_s: float) -> None:
        self.url = url
        self.interval_s = interval_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._view: dict[str, Any] | None = None
        self._error: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="top-fetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(_FETCH_TIMEOUT_S + 1)

    def latest(self) -> tuple[dict[str, Any] | None, str | None]:
        with self._lock:
            return self._view, self._error

    def _run(self) -> None:
        while not self._stopped.is_set():
            view, error = None, None
            try:
                request = urllib.request.Request(
                    self.url + "/dashboard/data", headers=self._headers
                )
                with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT_S) as response:
                    view = json.load(response)
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}" + (
                    " (wrong or missing --api-key)" if e.code == 401 else ""
                )
            except (OSError, ValueError) as e:
                error = str(getattr(e, "reason", e))
            with self._lock:
                if view is not None:
                    self._view = view
                self._error = error
            self._stopped.wait(self.interval_s)


def _loop(screen: Any, fetcher: _Fetcher) -> None:
    curses.curs_set(0)
    screen.timeout(100)  # getch waits at most 0.1 s: a key is seen at once
    while True:
        view, error = fetcher.latest()
        height, width = screen.getmaxyx()
        screen.erase()
        for y, line in enumerate(render_lines(view, error, fetcher.url)[:height]):
            screen.addnstr(y, 0, line, max(width - 1, 0))
        screen.refresh()
        if screen.getch() in (ord("q"), ord("Q")):
            return


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}ms"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_lines(view: dict[str, Any] | None, error: str | None, url: str) -> list[str]:
    """The screen as lines of at most 79 columns (curses cannot write an 80x24 screen's
    last cell)."""
    clock = time.strftime("%H:%M:%S")
    lines = [f"shoal top  {url}  {clock}  (q quits)"[:79]]
    if view is None:
        lines += ["", f"waiting for {url}/dashboard/data"]
        return [line[:79] for line in (*lines, f"! {error}" if error else "")]
    lines[0] = f"shoal top  {url}  {view['model']}"[:59].ljust(59) + f"q quits{clock:>13}"
    if error:
        lines.append(f"! {error} (showing the last view)")
    lines += [
        "",
        f"{'ENGINE':<13}{'STATE':<6}{'RUN':>5}{'WAIT':>5}{'KV%':>6}{'HIT%':>6}"
        f"{'IN t/s':>8}{'OUT t/s':>8}{'TTFT p50':>10}{'ITL p50':>10}",
    ]
    engines = view["engines"]
    for e in engines[:_MAX_ENGINE_ROWS]:
        hit = e["prefix_cache_hit_rate"]
        lines.append(
            f"{'EngineCore_' + str(e['engine']):<13}{e['state']:<6}{_num(e['running']):>5}"
            f"{_num(e['waiting']):>5}{_num(e['kv_cache_usage'] * 100, 1):>6}"
            f"{_num(None if hit is None else hit * 100, 1):>6}"
            f"{_num(e['prompt_tokens_per_s'], 1):>8}{_num(e['generation_tokens_per_s'], 1):>8}"
            f"{_ms(e['ttft_s']['p50']):>10}{_ms(e['itl_s']['p50']):>10}"
        )
    if len(engines) > _MAX_ENGINE_ROWS:
        lines.append(f"... {len(engines) - _MAX_ENGINE_ROWS} more engines")
    t = view["totals"]
    lines.append(
        f"{'total':<19}{_num(t['running']):>5}{_num(t['waiting']):>5}{'':>12}"
        f"{_num(t['prompt_tokens_per_s'], 1):>8}{_num(t['generation_tokens_per_s'], 1):>8}"
    )
    window_min = view["latency_window_s"] / 60
    lines += ["", f"LATENCY, last {window_min:.1f} min{'p50':>12}{'p90':>12}{'p99':>12}{'n':>8}"]
    for label, key in (("time to first token", "ttft_s"), ("inter-token latency", "itl_s")):
        lat = view["latency"][key]
        lines.append(
            f"  {label:<22}{_ms(lat['p50']):>12}{_ms(lat['p90']):>12}{_ms(lat['p99']):>12}"
            f"{_num(lat['count']):>8}"
        )
    requests = view["requests"]
    finished = "  ".join(f"{k} {_num(v)}" for k, v in requests["finished_total"].items())
    lines += [
        "",
        f"REQUESTS  received {_num(requests['received_total'])}  in flight "
        f"{_num(requests['in_flight'])}  rejected {_num(requests['rejected_total'])}",
        f"  finished  {finished}",
        "API SERVERS  "
        + "  ".join(f"{s['name']} ({_num(s['in_flight'])} in flight)" for s in view["servers"]),
        "RECENT ERRORS" + ("  none" if not view["errors"] else ""),
    ]
    for err in view["errors"][:3]:
        when = time.strftime("%H:%M:%S", time.localtime(err["time"]))
        lines.append(f"  {when} ApiServer_{err['server']} {err['kind']}: {err['message']}")
    return [line[:79] for line in lines]
