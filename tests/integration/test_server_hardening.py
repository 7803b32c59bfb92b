"""One bad request must never take the server down: each finding of that issue as a regression
test (error ids without internals, request-supplied chat templates, logprobs and prompt size,
idle connections and the log, body limits, bad fields, hosts, auth), the stats line and the
OpenAPI document."""
from __future__ import annotations

import argparse
import json
import logging
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx
import pytest
import schemathesis

from asyncpp.async_llm import EngineStats
from asyncpp.core.errors import EngineDeadError, InvalidRequest
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine_args import EngineArgs
from asyncpp.executor.stats import PipelineStats
from asyncpp.prompts import PROMPT_CHARS_PER_TOKEN
from asyncpp.server.app import build_app
from asyncpp.server.cli import add_serve_args, settings_from
from asyncpp.server.log_hygiene import LogHygiene, printable
from asyncpp.server.metrics import ServerMetrics
from asyncpp.server.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, CompletionRequest
from asyncpp.server.serving import ServerState
from asyncpp.server.settings import ServerSettings, default_allowed_hosts
from asyncpp.server.stats_log import log_stats_every, stats_line
from asyncpp.server.threaded import serve_in_thread
from helpers.http_server import API_KEY, CHAT_MESSAGES, MAX_MODEL_LEN, RunningServer, engine_args

REPO = Path(__file__).resolve().parents[2]
BODY_LIMIT = 64 * 1024
LIMITS = {"max_num_seqs": 4, "max_waiting_requests": 8, "max_logprobs": 5}
TRUSTING = ServerSettings(api_key=API_KEY, trust_request_chat_template=True, chat_template_timeout_s=1,
                          allowed_hosts=["127.0.0.1", "localhost"], max_request_body_bytes=BODY_LIMIT,
                          timeout_request_body_s=1, log_stats_interval_s=0, enable_dev_endpoints=True,
                          metrics_require_key=True)
SLOW_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def hardened(llama_dir, tok_dir):
    """Small limits, a trusted chat template, a Host list and a 64 KiB body limit."""
    app = build_app(engine_args(llama_dir, tok_dir, **LIMITS), settings=TRUSTING)
    with serve_in_thread(app) as url:
        yield RunningServer(url, app)


@pytest.fixture(scope="module")
def plain(server_pool):
    """The defaults (and a body limit of some MiB)."""
    return server_pool.get(pipeline_parallel_size=1)


def post(server: RunningServer, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        return http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


def error_of(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (status, param), error
    return error


# -- 2: a 5xx carries an error id, never a traceback or a path ------------------------------
STAGE_TRACEBACK = ('pipeline stage 1 (rank 1) raised RuntimeError: boom in /srv/someone/asyncpp/worker/x.py\n'
                   'Traceback (most recent call last):\n  File "/srv/someone/asyncpp/worker/x.py", line 42')


class DeadEngine:
    model_name = "stub"
    tokenizer = None
    config = SimpleNamespace(max_model_len=256, max_logprobs=20, max_num_seqs=8, max_waiting_requests=8)

    def __init__(self, error: Exception):
        self.error = error

    def is_healthy(self) -> bool:
        return False

    def dead_error(self) -> Exception:
        return self.error

    async def add_request(self, prompt, params, request_id=None):
        raise self.error


def stub_client(error: Exception) -> httpx.AsyncClient:
    app = build_app(EngineArgs())
    app.state.server = ServerState(DeadEngine(error), ServerMetrics(lambda: None, "stub"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://stub")


@pytest.mark.anyio
@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("GET", "/health")])
async def test_503_tells_the_first_line_and_an_error_id_the_log_has_in_full(method, path, caplog):
    async with stub_client(EngineDeadError(STAGE_TRACEBACK)) as client:
        response = await client.request(method, path, json={"prompt": "x"})
    error = response.json()["error"]
    assert response.status_code == 503 and error["error_id"] in error["message"]
    assert "Traceback" not in response.text and "/srv/someone" not in response.text
    assert "pipeline stage 1 (rank 1) raised RuntimeError" in error["message"]
    logged = [r.getMessage() for r in caplog.records if error["error_id"] in r.getMessage()]
    assert logged and STAGE_TRACEBACK in logged[0]


@pytest.mark.anyio
async def test_500_error_id_is_in_the_log_with_the_traceback(caplog):
    async with stub_client(RuntimeError("secret /srv/someone/x.py")) as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    error = response.json()["error"]
    assert response.status_code == 500 and error["type"] == "InternalServerError"
    assert "secret" not in response.text and error["error_id"] in error["message"]
    logged = [r for r in caplog.records if error["error_id"] in r.getMessage()]
    assert len(logged) == 1 and "secret" in str(logged[0].exc_info[1])


# -- 3: chat templates sent with the request -------------------------------------------------
def chat(**extra) -> dict:
    return {"messages": CHAT_MESSAGES, **GREEDY, **extra}


def test_request_chat_template_is_refused_unless_trusted(plain):
    error_of(post(plain, "/v1/chat/completions", chat(chat_template="{{ 'x' }}")), 400, "chat_template")
    refused = post(plain, "/v1/chat/completions", chat(chat_template_kwargs={"chat_template": "{{ 'x' }}"}))
    assert "--trust-request-chat-template" in error_of(refused, 400, "chat_template_kwargs")["message"]


@pytest.mark.parametrize("key", ["tokenize", "return_dict", "messages", "add_generation_prompt", "tools"])
def test_chat_template_kwargs_set_template_variables_only(plain, key):
    error = error_of(post(plain, "/v1/chat/completions", chat(chat_template_kwargs={key: True})), 400,
                     "chat_template_kwargs")
    assert key in error["message"]
    assert post(plain, "/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": True})).status_code == 200


def test_trusted_template_renders_off_the_loop_and_in_bounded_time(hardened):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rendered = post(hardened, "/v1/chat/completions", chat(chat_template=template))
    assert rendered.status_code == 200
    done: list[str] = []

    def slow() -> None:
        response = post(hardened, "/v1/chat/completions", chat(chat_template=SLOW_TEMPLATE))
        error_of(response, 400, "chat_template")
        done.append("template")

    thread = threading.Thread(target=slow)
    thread.start()
    with httpx.Client(base_url=hardened.url) as http:
        assert http.get("/health").status_code == 200
    done.append("health")
    thread.join()
    assert done == ["health", "template"]  # the render held no other client up
    assert post(hardened, "/v1/chat/completions", chat()).status_code == 200


MEMORY_BOMB = "{{ 'x' * 1000000000 }}{{ 'y' * 1000000000 }}"  # the issue's: 2 GB of text in the server


def vm(pid: int | str, field: str) -> int:
    """VmHWM (peak resident size) or VmRSS (now) of a process, in bytes."""
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def test_four_memory_bombs_get_400_from_a_capped_renderer_and_leave_the_server_alone(hardened):
    server_rss = vm("self", "VmRSS")  # the server runs in this process
    engine = hardened.app.state.server.engine
    renderers = engine.template_renderer_pids()
    assert len(renderers) == 2  # started with the server, as it trusts request templates
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(post(hardened, "/v1/chat/completions",
                                                                   chat(chat_template=MEMORY_BOMB))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=hardened.url) as http:
        assert http.get("/health").status_code == 200
    for thread in threads:
        thread.join()
    for response in answers:
        assert "more memory than a renderer may use" in error_of(response, 400, "chat_template")["message"]
    assert sorted(engine.template_renderer_pids()) == sorted(renderers)  # each answered (and was kept)
    cap = engine._prompts.sandbox.memory_bytes
    assert all(vm(pid, "VmHWM") < cap for pid in renderers)
    assert vm("self", "VmRSS") - server_rss < 64 * 2**20
    assert post(hardened, "/v1/chat/completions", chat()).status_code == 200


# -- 4: logprobs and prompt size -------------------------------------------------------------
def test_logprobs_over_max_logprobs_name_their_field(hardened):
    error_of(post(hardened, "/v1/completions", {"prompt": "x", "logprobs": 6}), 400, "logprobs")
    error_of(post(hardened, "/v1/chat/completions", chat(logprobs=True, top_logprobs=6)), 400, "top_logprobs")
    assert post(hardened, "/v1/completions", {"prompt": "x", "logprobs": 5, **GREEDY}).status_code == 200
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(logprobs=6).verify_for_model(100, max_logprobs=5)
    assert info.value.param == "logprobs"


@pytest.mark.parametrize("path,field", [("/v1/completions", "prompt"), ("/tokenize", "prompt"),
                                        ("/v1/chat/completions", "messages")])
def test_overlong_text_is_refused_before_tokenizing(plain, path, field):
    text = "a" * (PROMPT_CHARS_PER_TOKEN * MAX_MODEL_LEN + 1)
    body = {"messages": [{"role": "user", "content": text}]} if field == "messages" else {"prompt": text}
    error = error_of(post(plain, path, body), 400, field)
    assert str(len(text)) in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_a_million_ids_or_bools_are_400_and_health_answers_meanwhile(plain):
    """A body of 1.5 M token ids (or 800 k `true`s, each an error) under the body limit: the
    ids are checked off the event loop and a list stops at its first bad item (800 k
    validation errors took 28 s to build)."""
    bodies = [json.dumps({"prompt": ids}, separators=(",", ":")).encode()
              for ids in ([1] * 1_500_000, [True] * 800_000)]
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda b=b: answers.append(post(plain, "/v1/completions", b))) for b in bodies]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=plain.url) as http:
        while any(thread.is_alive() for thread in threads):
            assert http.get("/health").status_code == 200
    for thread in threads:
        thread.join()
    messages = sorted(error_of(response, 400, "prompt")["message"] for response in answers)
    assert messages[0].startswith("prompt is 1500000 tokens long")
    assert messages[1] == "prompt.0: Input should be a valid integer"  # the first bad item alone


# -- 5: idle connections, and a log that stays small and one line per record ------------------
def test_printable_escapes_and_truncates():
    assert printable("a\nINFO: forged\r\x1b[31m") == "a\\nINFO: forged\\r\\x1b[31m"
    assert printable("x" * 50, 10) == "x" * 10 + "...[40 more characters]"


def test_repeated_warnings_are_logged_once_per_interval_with_a_count():
    now = [0.0]
    hygiene = LogHygiene(interval_s=10, clock=lambda: now[0])

    def record(msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    passed = [hygiene.filter(record("bad %s", f"thing {i}")) for i in range(1000)]
    assert passed.count(True) == 1
    assert hygiene.filter(record("other"))
    assert hygiene.filter(logging.LogRecord("x", logging.INFO, "", 1, "info passes", (), None))
    now[0] = 11
    later = record("bad %s", "thing")
    assert hygiene.filter(later) and "[999 more like this in the last 11 s]" in later.getMessage()


def test_unknown_field_warning_cannot_forge_a_log_line(caplog):
    with caplog.at_level(logging.WARNING):
        CompletionRequest.model_validate_json(json.dumps({"prompt": "x", "a\nINFO: forged": 1}))
    assert [r for r in caplog.records if "forged" in r.getMessage()][0].getMessage().count("\n") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hundreds_of_idle_connections_leave_health_answering_and_the_log_small(llama_dir, tok_dir):
    """300 idle or half-sent connections against --limit-concurrency 16 stand in for 20,000."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "asyncpp", "serve", str(llama_dir), "--tokenizer", str(tok_dir), "--dtype", "float32",
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "64MiB", "--port", str(port),
           "--limit-concurrency", "16", "--timeout-request-headers", "600", "--log-stats-interval", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets: list[socket.socket] = []
    try:
        _wait_healthy(url, proc)
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
            sockets.append(sock)
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            for _ in range(100):
                http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "a\nFORGED": 1})
            http.get("/v1/x%0AFORGED")
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"\x00 not http\r\n\r\n")
                sock.recv(1024)
        assert len(_closed_by_server(sockets)) >= 300 - 16
    finally:
        for sock in sockets:
            sock.close()
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], output
    assert sum("Invalid HTTP request received" in line for line in lines) <= 3, output
    assert sum("ignoring unknown fields" in line for line in lines) <= 3, output
    assert len(lines) < 250, output  # startup, health polls, 102 access lines, a few warnings


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):  # bounded: the engine starts in seconds
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        threading.Event().wait(0.2)
    raise AssertionError("the server did not become healthy")


def _closed_by_server(sockets: list[socket.socket]) -> set[socket.socket]:
    """The sockets the server has closed: those that read as ended (or reset) until none has news."""
    closed: set[socket.socket] = set()
    while readable := select.select([s for s in sockets if s not in closed], [], [], 2)[0]:
        for sock in readable:
            try:
                if not sock.recv(4096):
                    closed.add(sock)
            except OSError:
                closed.add(sock)
    return closed


# -- 7: request bodies ------------------------------------------------------------------------
def test_body_over_the_limit_is_413_declared_or_streamed(hardened):
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    error_of(post(hardened, "/v1/completions", big), 413, None)

    def chunks():
        yield big[:1000]
        yield big[1000:]

    with httpx.Client(base_url=hardened.url, timeout=60) as http:  # no Content-Length: chunked
        response = http.post("/v1/completions", content=chunks(),
                             headers={"content-type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    error_of(response, 413, None)
    assert post(hardened, "/v1/completions", {"prompt": "x", **GREEDY}).status_code == 200


def test_body_that_never_arrives_is_408(hardened):
    port = int(hardened.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"pro")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_post_bodies_must_be_json(hardened, content_type):
    headers = {"Authorization": f"Bearer {API_KEY}"} | ({"content-type": content_type} if content_type else {})
    with httpx.Client(base_url=hardened.url, timeout=60) as http:
        response = http.post("/v1/completions", content=b'{"prompt": "x"}', headers=headers)
    error_of(response, 415, None)


# -- 8: fields that could hurt the engine, hosts, auth ---------------------------------------
BAD_FIELDS = [
    ("too many stop strings", "/v1/completions", {"prompt": "x", "stop": ["s"] * 10_000}, "stop"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("infinite repetition_penalty", "/v1/completions", b'{"prompt": "x", "repetition_penalty": Infinity}',
     "repetition_penalty"),
    ("top_p overflowing", "/v1/completions", b'{"prompt": "x", "top_p": 1e999}', "top_p"),
    ("huge top_k", "/v1/completions", {"prompt": "x", "top_k": 10**30}, "top_k"),
    ("bools as token ids", "/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("bools as stop token ids", "/v1/completions", {"prompt": "x", "stop_token_ids": [True]}, "stop_token_ids"),
    ("n over max_num_seqs", "/v1/completions", {"prompt": "x", "n": 5}, "n"),
    ("more prompts than the queue", "/v1/completions", {"prompt": ["x"] * 9}, "prompt"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ("audio part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
    ("unknown response_format", "/v1/chat/completions", chat(response_format={"type": "yaml"}), "response_format"),
    ("tool_choice required", "/v1/chat/completions", chat(tool_choice="required"), "tool_choice"),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools"),
    ("bools to detokenize", "/detokenize", {"tokens": [True]}, "tokens"),
    ("prompt_logprobs over max_logprobs", "/v1/completions", {"prompt": "x", "prompt_logprobs": 6}, "prompt_logprobs"),
    ("prompt_logprobs streamed", "/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True},
     "prompt_logprobs"),
    ("beam search", "/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("guided_json", "/v1/chat/completions", chat(guided_json={"type": "object"}), "guided_json"),
    ("chat echo", "/v1/chat/completions", chat(echo=True), "echo"),
]


@pytest.mark.parametrize("name,path,body,param", BAD_FIELDS, ids=[case[0] for case in BAD_FIELDS])
def test_bad_fields_are_400_naming_the_field(hardened, name, path, body, param):
    error_of(post(hardened, path, body), 400, param)


def test_prompt_logprobs_as_vllm_gives_them(hardened):
    whole = post(hardened, "/v1/completions", {"prompt": "San Francisco is a", "prompt_logprobs": 2, "n": 2,
                                               "return_token_ids": True, **GREEDY}).json()
    ids = post(hardened, "/tokenize", {"prompt": "San Francisco is a"}).json()["tokens"]
    for choice in whole["choices"]:  # each choice carries its prompt's
        positions = choice["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(ids)
        for token, entry in zip(ids[1:], positions[1:]):
            assert str(token) in entry and 2 <= len(entry) <= 3
            assert all(e["logprob"] <= 0 and e["rank"] >= 1 and e["decoded_token"] for e in entry.values())
    chat_response = post(hardened, "/v1/chat/completions", chat(prompt_logprobs=0)).json()
    assert chat_response["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in chat_response["prompt_logprobs"][1:])  # the prompt's token alone


def test_a_megabyte_stop_string_is_400(plain):
    error = error_of(post(plain, "/v1/completions", {"prompt": "x", "stop": "s" * 2**20}), 400, "stop")
    assert str(MAX_STOP_CHARS) in error["message"]
    many = error_of(post(plain, "/v1/completions", {"prompt": "x", "stop": ["s"] * (MAX_STOP_STRINGS + 1)}),
                    400, "stop")
    assert str(MAX_STOP_STRINGS) in many["message"]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat())])
def test_empty_model_name_is_404(hardened, path, body):
    error_of(post(hardened, path, {**body, "model": ""}), 404, "model")


def test_host_header_must_name_the_server(hardened):
    with httpx.Client(base_url=hardened.url, timeout=30) as http:
        assert http.get("/health", headers={"host": "evil.example:80"}).status_code == 421
        assert http.get("/health", headers={"host": "localhost:1"}).status_code == 200
        assert http.get("/health").status_code == 200
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "localhost"]
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.1.2.3") == ["10.1.2.3"]


def test_401_names_the_scheme_and_the_scheme_is_case_insensitive(hardened):
    with httpx.Client(base_url=hardened.url, timeout=30) as http:
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert http.get("/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200


# -- endpoints that let one client see or slow the others --------------------------------------
def test_reset_prefix_cache_with_dev_endpoints_and_metrics_behind_the_key(hardened):
    assert post(hardened, "/v1/completions", {"prompt": "a b c d e f g h i j k l m n o p q r", **GREEDY}).status_code \
        == 200
    with httpx.Client(base_url=hardened.url, timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert metrics.status_code == 200
    cached = next(float(line.rsplit(None, 1)[1]) for line in metrics.text.splitlines()
                  if line.startswith("asyncpp:kv_cache_blocks_cached"))
    reset = post(hardened, "/reset_prefix_cache", b"")
    assert reset.status_code == 200 and reset.json()["freed_blocks"] == cached > 0


def test_dev_endpoints_follow_vllm_server_dev_mode(monkeypatch):
    parser = argparse.ArgumentParser()
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    add_serve_args(parser)
    assert settings_from(parser.parse_args([])).enable_dev_endpoints
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "0")
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert not settings_from(parser.parse_args([])).enable_dev_endpoints
    assert settings_from(parser.parse_args(["--enable-dev-endpoints", "--metrics-require-key"])).metrics_require_key


# -- the periodic stats line ------------------------------------------------------------------
def _stats(prompt: int, generation: int, running: int = 0, hits: int = 0) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=0, kv_blocks_used=5, kv_blocks_cached=2, kv_blocks_total=10,
                       prompt_tokens_total=prompt, generation_tokens_total=generation, num_preemptions=0,
                       prefix_cache_queries=prompt, prefix_cache_hits=hits,
                       pipeline=PipelineStats([2.0, 1.0], 4.0), layer_partition=[2, 2])


def test_stats_line_reads_like_vllm():
    line = stats_line(_stats(0, 0), _stats(100, 50, running=2, hits=25), 10.0)
    assert line == ("Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, Running: 2 reqs, "
                    "Waiting: 0 reqs, KV cache usage: 50.0%, Prefix cache hit rate: 25.0%, Pipeline bubble: 62.5%")


@pytest.mark.anyio
async def test_stats_are_logged_every_interval(caplog):
    ticks = iter(range(10**6))
    with caplog.at_level(logging.INFO, logger="asyncpp.server.stats"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(log_stats_every, 0.001, lambda: _stats(next(ticks), 0, running=1))
            with anyio.fail_after(30):
                while len(caplog.records) < 3:
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    assert all(r.getMessage().startswith("Avg prompt throughput") for r in caplog.records)


# -- the OpenAPI document ---------------------------------------------------------------------
def test_openapi_document_lists_every_route_and_loads_in_schemathesis(hardened):
    with httpx.Client(base_url=hardened.url, timeout=30) as http:
        document = http.get("/openapi.json").json()
    routes = {(r.path, m.lower()) for r in hardened.app.routes for m in r.methods if m != "HEAD"}
    documented = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert routes - {("/openapi.json", "get")} == documented
    bodyless = {path for path, method in documented if "requestBody" not in document["paths"][path][method]}
    assert {path for path in bodyless if "post" in document["paths"][path]} == {"/reset_prefix_cache"}
    for (path, method) in documented:
        operation = document["paths"][path][method]
        assert {"200", "421", "500"} <= set(operation["responses"])
        if path not in bodyless:
            assert {"400", "401", "413", "415"} <= set(operation["responses"])
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    operations = [result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()]
    assert len(operations) == len(documented)
