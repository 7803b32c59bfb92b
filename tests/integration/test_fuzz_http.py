"""Property-based fuzzing of the JSON routes: whatever the body, the answer is 2xx or 4xx with
OpenAI's error shape, never a 5xx, and afterwards the engine is healthy and holds no KV block.

Bounded for CI: a fixed number of examples per route, derandomized (the same bodies every
run), against one small server (max_model_len 64, so a long generation is short)."""
from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpp.server.protocol import ROLES
from helpers.http_server import API_KEY, MODEL_NAME, RunningServer

FUZZ_SERVER = {"max_model_len": 64, "max_num_seqs": 4, "max_waiting_requests": 16}
EXAMPLES = {"/v1/completions": 80, "/v1/chat/completions": 80, "/tokenize": 40, "/detokenize": 40}


def fuzz_settings(path: str) -> settings:
    return settings(max_examples=EXAMPLES[path], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- values: plausible bodies (edge values now and then), and hostile ones -------------------
texts = st.text(max_size=30)
big_ints = st.integers(min_value=-2**70, max_value=2**70)
edge_floats = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, 0.0, -0.0])
token_ids = st.one_of(st.integers(0, 999), st.integers(0, 999), st.integers(-2, 1100), st.booleans(), big_ints)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 40), big_ints, st.floats(), texts),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=6)


def number(lo: float, hi: float) -> st.SearchStrategy:
    """Mostly in [lo, hi], sometimes just outside, sometimes an edge value (NaN, inf, ...)."""
    return st.one_of(st.floats(lo, hi), st.floats(lo, hi), st.floats(lo - 1, hi + 1), edge_floats)


def count(lo: int, hi: int) -> st.SearchStrategy:
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi), st.integers(lo - 2, hi + 2), big_ints)


SAMPLING = {
    "model": st.sampled_from([MODEL_NAME, MODEL_NAME, "", "other"]),
    "n": count(1, 3), "temperature": number(0, 2), "top_p": number(0.01, 1), "top_k": count(-1, 50),
    "min_p": number(0, 1), "seed": count(0, 100), "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2), "repetition_penalty": number(0.5, 2), "min_tokens": count(0, 4),
    "stop": st.one_of(texts, st.lists(texts, max_size=4), st.lists(texts, min_size=30, max_size=40)),
    "stop_token_ids": st.lists(token_ids, max_size=5),
    "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "return_token_ids": st.booleans(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": texts,
}
max_tokens = st.one_of(count(1, 8), count(1, 8), count(1, 8), st.none())  # None: up to max_model_len
prompts = st.one_of(texts.filter(bool), st.lists(texts, min_size=1, max_size=3), st.lists(token_ids, max_size=8),
                    st.lists(st.lists(token_ids, min_size=1, max_size=4), min_size=1, max_size=3))
COMPLETION = (
    {"prompt": prompts},
    {**SAMPLING, "max_tokens": max_tokens, "logprobs": count(0, 20), "echo": st.booleans(),
     "best_of": count(1, 3), "logit_bias": st.dictionaries(texts, st.floats(), max_size=2), "suffix": texts})
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url", "input_audio"]),
                                        "text": texts}), max_size=2)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "wizard"]),
                                           "content": st.one_of(texts, texts, parts, st.none())}),
                    min_size=1, max_size=3)
CHAT = (
    {"messages": messages},
    {**SAMPLING, "max_tokens": max_tokens, "max_completion_tokens": count(1, 8),
     "logprobs": st.booleans(), "top_logprobs": count(0, 20), "add_generation_prompt": st.booleans(),
     "chat_template": texts,
     "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "x", "tokenize", "messages"]),
                                             json_values, max_size=2),
     "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
     "tool_choice": st.sampled_from(["none", "auto", "required"]), "tools": st.lists(json_values, max_size=1)})
TOKENIZE = ({}, {"model": SAMPLING["model"], "prompt": texts, "messages": messages,
                 "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()})
DETOKENIZE = ({"tokens": st.lists(token_ids, max_size=10)}, {"model": SAMPLING["model"]})
FIELDS = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/tokenize": TOKENIZE,
          "/detokenize": DETOKENIZE}


def bodies(path: str) -> st.SearchStrategy[bytes]:
    """Mostly plausible JSON objects of the route's fields, and hostile ones: any JSON as any
    field's value, stray fields, JSON that is no object, bytes that are no JSON."""
    required, optional = FIELDS[path]
    plausible = st.fixed_dictionaries(required, optional=optional)
    everything = {**required, **optional}
    any_values = {name: st.one_of(value, json_values) for name, value in everything.items()}
    hostile = st.builds(lambda known, stray: {**stray, **known}, st.fixed_dictionaries({}, optional=any_values),
                        st.dictionaries(texts, json_values, max_size=2))
    as_json = st.one_of(plausible, plausible, plausible, hostile).map(lambda body: json.dumps(body).encode())
    others = st.one_of(st.binary(max_size=40), json_values.map(lambda value: json.dumps(value).encode()))
    return st.one_of(as_json, as_json, as_json, as_json, others)  # json.dumps writes NaN and Infinity


# -- what every answer must look like --------------------------------------------------------
def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        check_error(response.json(), response.status_code)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e[len("data: "):] for e in response.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", response.text
        for event in map(json.loads, events[:-1]):
            if "error" in event:
                assert event["error"]["code"] < 500, event
                check_error(event, event["error"]["code"])
    else:
        assert isinstance(response.json(), dict)


def check_error(body: Any, status: int) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] == status


@pytest.fixture(scope="module")
def fuzz_server(server_pool) -> RunningServer:
    return server_pool.get(**FUZZ_SERVER)


@pytest.mark.parametrize("path", list(EXAMPLES))
def test_fuzzed_bodies_get_2xx_or_4xx_and_leave_the_engine_idle(fuzz_server, path):
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=fuzz_server.url, headers=headers, timeout=60) as http:
        @fuzz_settings(path)
        @given(body=bodies(path))
        def post(body: bytes) -> None:
            check(http.post(path, content=body))

        post()
        fuzz_server.wait_idle()  # polls briefly: requests end, their KV blocks come back
        assert fuzz_server.engine.stats().kv_blocks_used == 0
        assert http.get("/health").status_code == 200
