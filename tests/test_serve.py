"""`edgemoe serve` as a client sees it: the OpenAI endpoints give the tokens the Python API
gives (greedy), streamed or not, with usage, seed and stop; bad requests get a 4xx naming
the field; concurrent requests all complete, each with its own answer; a client that leaves
cancels its generation, running or queued; /metrics speaks Prometheus' format."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from serving import Served

import edgemoe
from edgemoe.converters.convert import convert

BUDGET = "60KB"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("serve") / "tiny-mixtral"
    convert(tiny_checkpoint("mixtral"), dst, bits=8, progress=False)
    return dst


@pytest.fixture(scope="module")
def server(model_dir):
    s = Served(model_dir, "--memory-budget", BUDGET)
    yield s
    # uvicorn ends on SIGTERM after a graceful shutdown, then lets the signal take the process
    assert s.stop() in (0, -signal.SIGTERM) and "Traceback" not in "".join(s.log), "".join(s.log)


@pytest.fixture(scope="module")
def local(model_dir):
    return edgemoe.load(model_dir, memory_budget=BUDGET)


def sse(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            if data == "[DONE]":
                events.append({"done": True})
                break
            events.append(json.loads(data))
    return events


def test_models_health_and_loopback(server):
    assert server.url.startswith("http://127.0.0.1:")
    with server.client() as c:
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-mixtral"] and models["object"] == "list"
        assert c.get("/health").json()["status"] == "ok"


def test_completion_is_the_python_api_greedy_text_with_usage(server, local):
    prompt = "The robot walked"
    want = local.generate(prompt, max_new_tokens=12, temperature=0)
    with server.client() as c:
        r = c.post(
            "/v1/completions", json={"model": "tiny-mixtral", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == want
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(local.encode(prompt))
    n = usage["completion_tokens"]
    assert (n == 12 and body["choices"][0]["finish_reason"] == "length") or body["choices"][0][
        "finish_reason"
    ] == "stop"
    assert usage["total_tokens"] == usage["prompt_tokens"] + n


def test_streamed_completion_and_chat_match_unstreamed(server):
    req = {"prompt": "the stars", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    with server.client() as c:
        whole = c.post("/v1/completions", json=req).json()
        with c.stream(
            "POST", "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse(r)
    assert events[-1] == {"done": True}
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == 20
    pieces = [e["choices"][0]["text"] for e in events[:-2]]
    assert len(pieces) > 3 and "".join(pieces) == whole["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"

    chat = {"messages": [{"role": "user", "content": "Sing about the river"}], "max_tokens": 16, "temperature": 0}
    with server.client() as c:
        whole = c.post("/v1/chat/completions", json=chat).json()
        with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            events = sse(r)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert whole["usage"]["completion_tokens"] >= 1


def test_seed_temperature_top_p_and_stop(server, local):
    req = {"prompt": "the rain fell", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "ignore_eos": True}
    with server.client() as c:
        texts = [c.post("/v1/completions", json={**req, "seed": s}).json()["choices"][0]["text"] for s in (7, 7, 8)]
        assert texts[0] == texts[1] and texts[0] != texts[2]
        greedy = c.post("/v1/completions", json={**req, "temperature": 0}).json()["choices"][0]["text"]
        stop = greedy[6:9]
        assert stop.strip(), greedy
        cut = c.post("/v1/completions", json={**req, "temperature": 0, "stop": [stop, "zzzz"]}).json()
    assert cut["choices"][0]["text"] == greedy[: greedy.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "'gpt-4o' does not exist"),
        ("/v1/completions", {"prompt": [5] * 300}, 400, "context holds 256"),
        ("/v1/completions", {"prompt": [5] * 200, "max_tokens": 100}, 400, "lower max_tokens to at most 56"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens must be between 1 and"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1 and"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, 400, "max_tokens must be an integer"),
        ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens must be an integer"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
        ("/v1/completions", {"prompt": "x", "top_p": 5}, 400, "top_p must be between 0 and 1"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop must be a string"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed must be a non-negative integer"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
        ("/v1/completions", {"prompt": [5, 99999]}, 400, "outside the vocabulary"),
        ("/v1/completions", {}, 400, "prompt is missing"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role must be a string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}]}, 400, "context holds 256"),
    ],
)
def test_bad_requests_get_4xx_naming_the_problem(server, path, body, status, words):
    with server.client() as c:
        r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err["message"]
    assert err["type"] == "invalid_request_error"


def test_wrong_method_and_path_are_4xx(server):
    with server.client() as c:
        assert c.get("/v1/chat/completions").status_code == 405
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_concurrent_requests_each_get_their_own_answer(server, local):
    prompts = [f"the robot number {i} sang" for i in range(6)]
    want = [local.generate(p, max_new_tokens=10, temperature=0) for p in prompts]
    got: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        with server.client() as c:
            r = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 10, "temperature": 0})
            got[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    with server.client() as c:
        snap = c.get("/api/cache").json()
    assert 0 < snap["expert_cache_bytes"] <= snap["memory_budget"] == 60_000
    assert snap["expert_cache_peak_bytes"] <= snap["memory_budget"]


def test_metrics_are_prometheus_text(server):
    with server.client() as c:
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = server.metrics()
    for name in (
        "edgemoe_tokens_per_second",
        "edgemoe_queue_length",
        "edgemoe_expert_cache_hit_ratio",
        "edgemoe_expert_bytes_read_total",
        "edgemoe_process_resident_memory_bytes",
        "edgemoe_expert_cache_budget_bytes",
        'edgemoe_time_to_first_token_seconds{quantile="0.99"}',
        'edgemoe_requests_total{outcome="completed"}',
    ):
        assert name in m, name
    assert m["edgemoe_generated_tokens_total"] >= 2 and m["edgemoe_expert_bytes_read_total"] > 0
    assert 0 < m["edgemoe_expert_cache_hit_ratio"] < 1
    for line in r.text.splitlines():  # every sample line follows a HELP and a TYPE of its family
        assert line.startswith(("# HELP edgemoe_", "# TYPE edgemoe_", "edgemoe_")), line


@pytest.fixture(scope="module")
def slow_server(model_dir):
    """Storage emulating an SD card at the smallest budget: every token waits for reads, so a
    long generation lasts seconds. With an API key."""
    m = edgemoe.load(model_dir)
    s = Served(
        model_dir,
        "--memory-budget",
        str(m.min_budget),
        "--device",
        "raspberry-pi-4-sd",
        "--preload",
        "none",
        "--api-key",
        "sesame",
    )
    yield s
    s.stop()


def test_api_key(slow_server):
    with slow_server.client() as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and "--api-key" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_cancels_its_generation(slow_server):
    auth = {"Authorization": "Bearer sesame"}
    long = {"prompt": "the robot", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "stream": True}
    before = slow_server.metrics()
    with slow_server.client(headers=auth) as c, c.stream("POST", "/v1/completions", json=long) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # a second request waits behind the first; its client gives up while it is queued
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={**long, "stream": False}, timeout=0.5)
    # both connections are closed now: the running one stops, the queued one never starts
    key = 'edgemoe_requests_total{outcome="cancelled"}'
    assert _wait_for(lambda: slow_server.metrics()[key] == before[key] + 2), slow_server.metrics()
    after = slow_server.metrics()
    made = after["edgemoe_generated_tokens_total"] - before["edgemoe_generated_tokens_total"]
    assert 1 <= made < 250
    assert after["edgemoe_queue_length"] == 0 and after["edgemoe_requests_running"] == 0
    # and the server serves the next request
    with slow_server.client(headers=auth) as c:
        r = c.post("/v1/completions", json={"prompt": "the robot", "max_tokens": 3, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 3
