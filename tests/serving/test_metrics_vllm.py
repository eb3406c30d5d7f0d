"""/metrics as vLLM's dashboards read it: `vllm:` names with `model_name` and `engine` labels,
requests counted once whatever their n, the `?prefix=` switch, process metrics of every role,
and the repository's Grafana dashboard naming only metrics a running server exports. One
server: 2 API servers, 2 engines; on both frontends (`[python]`, `[rust]`: one native process
in place of the API servers)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving.api_helpers import TIMEOUT_S, get_metrics, running_server, wait_until
from tests.serving.conftest import ServeProcess

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shoal.json"
# vLLM v1's families (exposition names) that shoal serves, as `vllm:<name>`.
VLLM_FAMILIES = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prefix_cache_queries_total": "counter",
    "prefix_cache_hits_total": "counter",
    "num_preemptions_total": "counter",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "request_success_total": "counter",
    "iteration_tokens_total": "histogram",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "request_max_num_generation_tokens": "histogram",
    "request_params_n": "histogram",
    "request_params_max_tokens": "histogram",
    "cache_config_info": "gauge",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, frontend: str) -> Iterator[ServeProcess]:
    flags = ("--api-server-count", "2", "--data-parallel-size", "2")
    with running_server(tiny_model_dir, *flags, frontend=frontend) as server:
        yield server


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    found = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        found.append((match.group(1), labels, float(match.group(3))))
    return found


def total(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for sample, have, value in samples(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def _idle(url: str) -> bool:
    text = get_metrics(url)[0]
    return (
        total(text, "vllm:num_requests_running") == 0
        and total(text, "vllm:num_requests_waiting") == 0
    )


def test_every_vllm_family_is_served_with_model_name_and_engine_labels(
    url: str, model: str
) -> None:
    text = httpx.get(f"{url}/metrics", params={"prefix": "vllm"}, timeout=TIMEOUT_S).text
    types = dict(re.findall(r"^# TYPE vllm:(\S+) (\S+)$", text, re.M))
    assert types == VLLM_FAMILIES
    assert not re.search(r"^shoal:", text, re.M)
    for name, labels, _ in samples(text):
        if name.startswith("process_"):
            continue
        assert labels.get("model_name") == model, name
        assert labels.get("engine") in ("0", "1"), name
    assert total(text, "vllm:cache_config_info", engine="1", block_size="16") == 1
    # Every shoal-only family keeps its shoal: name; every vllm: one is also under shoal:.
    shoal = httpx.get(f"{url}/metrics", params={"prefix": "shoal"}, timeout=TIMEOUT_S).text
    assert not re.search(r"^vllm:", shoal, re.M)
    shoal_types = dict(re.findall(r"^# TYPE shoal:(\S+) (\S+)$", shoal, re.M))
    assert VLLM_FAMILIES.items() <= shoal_types.items()
    assert {"kv_cache_blocks_free", "api_requests_in_flight"} <= shoal_types.keys()


def test_an_unknown_prefix_is_a_400_naming_it(url: str) -> None:
    response = httpx.get(f"{url}/metrics", params={"prefix": "prom"}, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prefix"


def test_a_request_with_n_sequences_counts_once(url: str, model: str) -> None:
    wait_until(lambda: _idle(url))
    before = get_metrics(url)[0]
    body = {"model": model, "prompt": "count me once", "max_tokens": 5, "n": 3}
    body |= {"ignore_eos": True, "temperature": 1.0, "seed": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    wait_until(lambda: _idle(url))
    after = get_metrics(url)[0]

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert grew("vllm:request_success_total") == 1
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:request_queue_time_seconds_count") == 1
    assert grew("vllm:generation_tokens_total") == 15
    assert grew("vllm:request_generation_tokens_sum") == 15
    assert grew("vllm:request_max_num_generation_tokens_sum") == 5
    assert grew("vllm:request_params_n_sum") == 3
    num_prompt = len(
        httpx.post(f"{url}/tokenize", json={"prompt": body["prompt"]}).json()["tokens"]
    )
    assert grew("vllm:prompt_tokens_total") == num_prompt
    assert grew("vllm:request_prompt_tokens_sum") == num_prompt
    # The token-level histogram counts every sequence's gaps.
    assert grew("vllm:inter_token_latency_seconds_count") == 3 * 4
    # The shoal: copy is the same family.
    assert grew("shoal:request_success_total") == 1


def test_a_repeated_prompt_hits_the_prefix_cache(url: str, model: str) -> None:
    wait_until(lambda: _idle(url))
    before = get_metrics(url)[0]
    prompt = " ".join(f"word{i}" for i in range(40))
    for _ in range(4):  # two engines: each sees the prompt at least twice
        body = {"model": model, "prompt": prompt, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT_S).is_success
    wait_until(lambda: _idle(url))
    after = get_metrics(url)[0]
    queries = total(after, "vllm:prefix_cache_queries_total") - total(
        before, "vllm:prefix_cache_queries_total"
    )
    hits = total(after, "vllm:prefix_cache_hits_total") - total(
        before, "vllm:prefix_cache_hits_total"
    )
    assert queries > 0 and 0 < hits < queries


def test_process_metrics_cover_every_role(url: str, frontend: str) -> None:
    text = get_metrics(url)[0]
    roles = {labels["process"] for name, labels, _ in samples(text) if name == "process_open_fds"}
    # The native frontend is one process, `RustFrontend`, in place of the API servers.
    frontends = {"ApiServer_0", "ApiServer_1"} if frontend == "python" else {"RustFrontend"}
    expected = {"launcher", "EngineCore_0", "EngineCore_1", *frontends}
    assert expected <= roles
    for role in expected:
        assert total(text, "process_resident_memory_bytes", process=role) > 0


def _grafana_metric_names() -> set[str]:
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(?:vllm|shoal):[a-zA-Z0-9_]+|\bprocess_[a-z_]+", expr))
    return names


def test_every_grafana_query_names_an_exported_metric(url: str) -> None:
    names = _grafana_metric_names()
    assert any(name.startswith("vllm:") for name in names)
    exported = {name for name, _, _ in samples(get_metrics(url)[0])}
    assert sorted(names - exported) == []
