"""The `/dashboard` page in a real browser: Debian's Chromium driven by Playwright (never a
browser download), against a server with 2 API servers, 2 engines and an API key, under a
small load. The page's numbers change while the load runs and equal /metrics once it ends;
a screenshot is kept under the test's temp dir (a CI artefact). Also `/dashboard/data`
itself: the key on every route, the view's figures, and an engine killed under
--restart-dead-engines showing as down and in the recent errors."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.serving.api_helpers import TIMEOUT_S, running_server, wait_until
from tests.serving.conftest import ServeProcess
from tests.serving.test_metrics_vllm import total

CHROMIUM = "/usr/bin/chromium"
KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_ENGINES = 2


@pytest.fixture(scope="module")
def server(tiny_model_dir: str) -> Iterator[ServeProcess]:
    flags = ("--api-server-count", "2", "--data-parallel-size", str(NUM_ENGINES))
    with running_server(tiny_model_dir, *flags, "--api-key", KEY) as server:
        yield server


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"][0]["id"]


class Load:
    """`workers` threads sending completions until stopped."""

    def __init__(self, url: str, model: str, workers: int = 3) -> None:
        self.url, self.model = url, model
        self.stopped = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(workers)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def _run(self) -> None:
        body = {"model": self.model, "prompt": "keep the engines busy", "max_tokens": 48}
        body |= {"ignore_eos": True, "temperature": 0}
        with httpx.Client(headers=AUTH, timeout=TIMEOUT_S) as client:
            while not self.stopped.is_set():
                self.statuses.append(
                    client.post(f"{self.url}/v1/completions", json=body).status_code
                )

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(TIMEOUT_S)
        assert set(self.statuses) <= {200}, self.statuses


def _metrics(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.text


def _data(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/dashboard/data", headers=AUTH, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def _idle(url: str) -> bool:
    view = _data(url)
    return view["totals"]["running"] == 0 and view["requests"]["in_flight"] == 0


def test_every_dashboard_route_wants_the_key(url: str) -> None:
    for path in ("/dashboard", "/dashboard/data", "/dashboard/dashboard.js"):
        refused = httpx.get(f"{url}{path}", timeout=TIMEOUT_S)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Basic"), path
        wrong = httpx.get(f"{url}{path}", auth=("any", "wrong-key"), timeout=TIMEOUT_S)
        assert wrong.status_code == 401, path
        for ok in (
            httpx.get(f"{url}{path}", headers=AUTH, timeout=TIMEOUT_S),
            httpx.get(f"{url}{path}", headers={"x-api-key": KEY}, timeout=TIMEOUT_S),
            httpx.get(f"{url}{path}", auth=("anyone", KEY), timeout=TIMEOUT_S),
        ):
            assert ok.status_code == 200, path
    page = httpx.get(f"{url}/dashboard", headers=AUTH, timeout=TIMEOUT_S).text
    # Everything the page loads comes from this server.
    assert "http://" not in page and "https://" not in page


def test_the_view_covers_engines_servers_and_latency(url: str, model: str) -> None:
    body = {"model": model, "prompt": "a few tokens", "max_tokens": 8, "ignore_eos": True}
    for _ in range(4):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT_S)
        assert response.status_code == 200
    wait_until(lambda: _idle(url))
    view = _data(url)
    assert view["model"] == model
    assert [e["engine"] for e in view["engines"]] == list(range(NUM_ENGINES))
    assert all(e["state"] == "up" and e["kv_blocks_total"] == 256 for e in view["engines"])
    assert [s["name"] for s in view["servers"]] == ["ApiServer_0", "ApiServer_1"]
    assert all(s["in_flight"] == 0 for s in view["servers"])
    ttft = view["latency"]["ttft_s"]
    assert ttft["count"] >= 4 and 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    assert view["latency"]["itl_s"]["count"] >= 4 * 7
    assert view["requests"]["finished_total"]["length"] >= 4
    assert view["errors"] == []


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian's chromium package)"
)
def test_the_page_shows_the_run_live_and_matches_metrics(
    url: str, model: str, tmp_path: Path
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # Without the key the browser gets the 401 (a headless browser cannot ask for a
            # login: navigation fails on the challenge).
            anonymous = browser.new_context()
            assert anonymous.request.get(f"{url}/dashboard").status == 401
            with pytest.raises(PlaywrightError, match="AUTH"):
                anonymous.new_page().goto(f"{url}/dashboard")
            anonymous.close()
            context = browser.new_context(
                http_credentials={"username": "shoal", "password": KEY},
                viewport={"width": 1400, "height": 1000},
            )
            page = context.new_page()
            assert page.goto(f"{url}/dashboard").status == 200
            _check_live_page(page, url, model, tmp_path)
            context.close()
        finally:
            browser.close()


def _generated(page: Any) -> float:
    return float(page.get_attribute("#total-generated", "data-value") or "nan")


def _check_live_page(page: Any, url: str, model: str, tmp_path: Path) -> None:
    page.wait_for_function("Number(document.getElementById('updated').dataset.seq) >= 1")
    assert page.inner_text("#model") == model
    assert page.inner_text("#status") == "live"
    assert page.locator("#engines tbody tr").count() == NUM_ENGINES
    assert page.locator("#servers tbody tr").count() == 2
    with Load(url, model):
        # The numbers move while the load runs: three different totals in a row.
        seen = {_generated(page)}
        for _ in range(2):
            last = max(seen)
            page.wait_for_function(
                f"Number(document.getElementById('total-generated').dataset.value) > {last}",
                timeout=TIMEOUT_S * 1000,
            )
            seen.add(_generated(page))
        assert len(seen) >= 3
        # What the page shows is never ahead of /metrics, read just after it.
        shown = _generated(page)
        assert shown <= total(_metrics(url), "vllm:generation_tokens_total")
        page.screenshot(path=str(tmp_path / "dashboard-under-load.png"), full_page=True)
    wait_until(lambda: _idle(url))
    # Idle now: two page updates later, every figure equals /metrics (within rounding).
    seq = int(page.get_attribute("#updated", "data-seq") or "0")
    page.wait_for_function(f"Number(document.getElementById('updated').dataset.seq) >= {seq + 2}")
    text = _metrics(url)
    for k in range(NUM_ENGINES):
        row = page.locator(f"#engine-{k}")
        for field, metric in (
            ("generation_tokens_total", "vllm:generation_tokens_total"),
            ("prompt_tokens_total", "vllm:prompt_tokens_total"),
            ("running", "vllm:num_requests_running"),
            ("kv_cache_usage", "vllm:kv_cache_usage_perc"),
            ("preemptions_total", "vllm:num_preemptions_total"),
        ):
            value = float(row.locator(f"[data-field={field}]").get_attribute("data-value") or "nan")
            expected = total(text, metric, engine=str(k))
            assert value == pytest.approx(expected, rel=0.01, abs=1e-9), (k, field)
    assert _generated(page) == pytest.approx(total(text, "vllm:generation_tokens_total"))
    finished = float(page.get_attribute("#requests-finished_length", "data-value") or "nan")
    assert finished == total(text, "vllm:request_success_total", finished_reason="length")
    assert page.locator("#errors li").first.inner_text() == "none"
    path = tmp_path / "dashboard.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    print(f"dashboard screenshots: {tmp_path}")


def test_a_killed_engine_shows_as_down_and_in_the_recent_errors(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--data-parallel-size", "2", "--restart-dead-engines")
    assert server.url is not None
    url = server.url

    def view() -> dict[str, Any]:
        return httpx.get(f"{url}/dashboard/data", timeout=TIMEOUT_S).json()

    assert view()["errors"] == []
    old = server.child_named("EngineCore_1")
    old.kill()
    # The replacement is held in its start-up, so the engine stays down for the checks.
    replacement: list[psutil.Process] = []

    def replaced() -> bool:
        with contextlib.suppress(AssertionError):
            replacement[:] = [server.child_named("EngineCore_1")]
        return bool(replacement) and replacement[0].pid != old.pid

    wait_until(replaced, timeout_s=60)
    server.seen_pids.add(replacement[0].pid)
    replacement[0].suspend()
    try:
        wait_until(lambda: view()["engines"][1]["state"] == "down")
        down = view()
        assert down["engines"][0]["state"] == "up"
        assert "engine 1 died" in down["engines"][1]["down_reason"]
        (error,) = [e for e in down["errors"] if e["kind"] == "engine 1 down"]
        assert "engine 1 died" in error["message"]
    finally:
        replacement[0].resume()
    server.wait_for_log(r"EngineCore_1 \(pid \d+\) is ready again", 120)
    wait_until(lambda: view()["engines"][1]["state"] == "up")
    assert any(e["kind"] == "engine 1 down" for e in view()["errors"])  # still listed
    assert server.stop(signal.SIGTERM, 60) == 0
    assert server.leftovers() == []
