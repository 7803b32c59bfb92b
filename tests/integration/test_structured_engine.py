"""Structured output through the whole engine on the tiny random Llama (which samples anything
a grammar allows, so every constraint is pushed to its edges), with the pipeline's hazards at
once: P=2 with two virtual engines and several microbatches in flight, chunked prompts,
preemption in a tiny KV cache, shared prefixes, n=2, aborts and logprobs."""
from __future__ import annotations

import json
import math
import re

import anyio
import jsonschema
import pytest

from asyncpp import LLM, AsyncLLM, SamplingParams
from asyncpp.async_llm import EngineStats
from asyncpp.core.outputs import RequestOutput
from helpers.models import TINY_LLAMA_BLOCK_BYTES

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"enum": ["x", "y"]}, "ok": {"type": ["boolean", "null"]}},
          "required": ["id", "tag", "ok"]}
CONSTRAINTS = [  # (structured_outputs, does this text follow it)
    ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
    ({"choice": ["alpha", "beta", "gamma"]}, lambda text: text in ("alpha", "beta", "gamma")),
    ({"json": SCHEMA, "disable_any_whitespace": True}, lambda text: jsonschema.validate(json.loads(text), SCHEMA)
     or True),
    ({"grammar": 'root ::= "(" [a-c] [a-c]? ")"'}, lambda text: re.fullmatch(r"\([a-c]{1,2}\)", text)),
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "disable_by_batch_size": 64}
SYSTEM = "The capital of France is Paris. Paris sits on the Seine, a river that bends through the city. "
FORCED = "forced-answer"


async def final(llm: AsyncLLM, prompt: str, params: SamplingParams, request_id: str | None = None,
                abort_after: int | None = None) -> RequestOutput:
    out = None
    async for out in llm.generate(prompt, params, request_id):
        if abort_after is not None and len(out.outputs[0].token_ids) >= abort_after:
            await llm.abort(request_id)
    assert out is not None
    return out


@pytest.mark.parametrize("speculative_config", [None, NGRAM])
async def test_every_constrained_output_follows_its_grammar_through_the_pipeline(llama_dir, tok_dir,
                                                                                 speculative_config):
    """With speculation too: proposals in flight through preemption and aborts."""
    memory = str(2 * 12 * TINY_LLAMA_BLOCK_BYTES)  # 12 blocks a VE: the requests below contend for them
    async with AsyncLLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", device="cpu", max_model_len=128,
                        kv_cache_memory=memory, pipeline_parallel_size=2, num_virtual_engines=2,
                        max_num_batched_tokens=32, speculative_config=speculative_config) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        alone = await final(llm, "San Francisco is a", greedy)
        outs: dict[int, RequestOutput] = {}

        async def run(i: int) -> None:
            fields = CONSTRAINTS[i % len(CONSTRAINTS)][0]
            params = SamplingParams(temperature=1.0, max_tokens=40, n=2, seed=i, logprobs=2,
                                    structured_outputs=fields)
            abort_after = 2 if i % 6 == 5 else None
            outs[i] = await final(llm, SYSTEM[:20 + 7 * i] + f" Question {i}:", params, f"r{i}", abort_after)

        async def beside() -> None:
            outs[-1] = await final(llm, "San Francisco is a", greedy)

        async def forced() -> None:  # a long prompt in several chunks; the grammar leaves one way out
            outs[-2] = await final(llm, SYSTEM * 2, SamplingParams(temperature=1.0, max_tokens=20,
                                                                   structured_outputs={"choice": [FORCED]}))

        async def filler(j: int) -> None:  # long unconstrained outputs that keep growing: blocks run out
            outs[-3 - j] = await final(llm, SYSTEM[:40] + f" Filler {j}:",
                                       SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))

        async with anyio.create_task_group() as tg:
            for j in range(4):
                tg.start_soon(filler, j)
            for i in range(12):
                tg.start_soon(run, i)
            tg.start_soon(beside)
            tg.start_soon(forced)
        stats = llm.stats()
        assert (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert speculative_config is None or stats.spec_decode.num_drafts > 0
    assert outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids  # unconstrained output unchanged
    assert outs[-2].outputs[0].text == FORCED and outs[-2].outputs[0].finish_reason == "stop"
    for i in range(12):
        follows = CONSTRAINTS[i % len(CONSTRAINTS)][1]
        for c in outs[i].outputs:
            if i % 6 == 5:
                assert c.finish_reason in ("abort", "stop")
                continue
            assert c.finish_reason == "stop" and follows(c.text), (i, c.text)
            assert len(c.logprobs) == len(c.token_ids) and all(math.isfinite(e[t].logprob)
                                                                for e, t in zip(c.logprobs, c.token_ids))


@pytest.mark.parametrize("speculative_config", [None, NGRAM])
async def test_the_grammar_applies_after_the_reasoning(llama_dir, tok_dir, speculative_config):
    """With speculation too: a proposal made while reasoning stops before the end marker."""
    async with AsyncLLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", device="cpu", max_model_len=128,
                        kv_cache_memory="8MiB", reasoning_parser="deepseek_r1",
                        speculative_config=speculative_config) as llm:
        params = SamplingParams(temperature=1.0, max_tokens=8, seed=0, structured_outputs={"regex": "z{5}"})
        closed = await final(llm, "Question: <think>I know this.</think>", params)
        thinking = await final(llm, "Question: <think>", params)
    assert closed.outputs[0].text == "zzzzz"
    assert thinking.outputs[0].text != "zzzzz" and thinking.outputs[0].finish_reason == "length"


def test_offline_chat_renders_tools_and_constrains_the_reply(llama_dir, tok_dir):
    template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}(a={{ c.function.arguments.a }}){% endfor %} | "
                "{% endfor %}assistant:")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    conversation = [{"role": "user", "content": "1 + 2?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    with LLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", device="cpu", max_model_len=128,
             kv_cache_memory="8MiB") as llm:
        outs = llm.chat([conversation, conversation[:1]],
                        SamplingParams(temperature=1.0, max_tokens=20, structured_outputs={"choice": ["3", "three"]}),
                        chat_template=template, tools=tools)
    assert outs[0].prompt == "[tool add]user: 1 + 2? | assistant: add(a=1) | tool: 3 | assistant:"
    assert [o.outputs[0].text in ("3", "three") for o in outs] == [True, True]


# -- with speculation ------------------------------------------------------------------------------------

ITEMS = {"type": "array", "items": {"enum": ["alpha", "beta"]}, "minItems": 6, "maxItems": 6}
REPEATING = [  # (structured_outputs, prompt, does this text follow it): text the output's or prompt's n-grams propose
    ({"json": ITEMS, "disable_any_whitespace": True}, "List:",
     lambda text: jsonschema.validate(json.loads(text), ITEMS) or True),
    ({"regex": r"(ab-){5}[0-9]{2}"}, "Code:", lambda text: re.fullmatch(r"(ab-){5}[0-9]{2}", text)),
    ({"choice": ["Paris sits on the Seine", "Paris is big"]}, SYSTEM + " Where is Paris?",
     lambda text: text in ("Paris sits on the Seine", "Paris is big")),
    (CONSTRAINTS[2][0], 'Reply {"id": 12, "tag": "x", "ok": true} again:', CONSTRAINTS[2][1]),
]


async def constrained_outputs(llama_dir, tok_dir, params: list[SamplingParams], speculative_config=None,
                              **kwargs) -> tuple[list[RequestOutput], EngineStats]:
    """REPEATING's prompts, each under its grammar (params[i] with REPEATING[i % 4]), concurrently;
    and the engine's stats."""
    outs: dict[int, RequestOutput] = {}
    async with AsyncLLM(str(llama_dir), tokenizer=str(tok_dir), dtype="float32", device="cpu", max_model_len=128,
                        kv_cache_memory="8MiB", speculative_config=speculative_config, **kwargs) as llm:
        async def run(i: int) -> None:
            outs[i] = await final(llm, REPEATING[i % len(REPEATING)][1], params[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(params)):
                tg.start_soon(run, i)
        return [outs[i] for i in range(len(params))], llm.stats()


def assert_follow(outs: list[RequestOutput]) -> None:
    for i, out in enumerate(outs):
        for c in out.outputs:
            assert c.finish_reason == "stop" and REPEATING[i % len(REPEATING)][2](c.text), (i, c.text)


@pytest.mark.parametrize("pp", [1, 2])
async def test_speculation_under_a_grammar_keeps_greedy_output(llama_dir, tok_dir, pp):
    """The grammar cuts each proposal and masks each verified row: the same tokens as without
    speculation, several of them accepted per step where the grammar forces what was said before."""
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=entry[0]) for entry in REPEATING]
    plain, _ = await constrained_outputs(llama_dir, tok_dir, params, pipeline_parallel_size=pp)
    spec, stats = await constrained_outputs(llama_dir, tok_dir, params, NGRAM, pipeline_parallel_size=pp)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert_follow(spec)
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("pp", [1, 2])
async def test_a_draft_model_under_a_grammar_keeps_greedy_output(llama_dir, tok_dir, pp):
    """The target as its own draft: its proposals are what the random target would pick unmasked,
    which the grammar mostly forbids, so it cuts them (often to nothing); the output stays the
    plain one and follows the grammar, and no block of either model is left."""
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=entry[0]) for entry in REPEATING]
    draft = {"model": str(llama_dir), "num_speculative_tokens": 3, "disable_by_batch_size": 64}
    plain, _ = await constrained_outputs(llama_dir, tok_dir, params, pipeline_parallel_size=pp)
    spec, stats = await constrained_outputs(llama_dir, tok_dir, params, draft, pipeline_parallel_size=pp)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert_follow(spec)
    assert stats.spec_decode.draft_seconds > 0  # the draft ran for the constrained sequences
    assert stats.kv_blocks_used == 0 and stats.draft_kv_blocks_used == 0


@pytest.mark.parametrize("pp", [1, 2])
async def test_seeded_sampling_under_a_grammar_with_speculation(llama_dir, tok_dir, pp):
    """Each verified row samples as the plain sampler would there, mask included: a seeded
    request's tokens do not depend on speculation, and follow the grammar."""
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=48, seed=i, n=2, structured_outputs=entry[0])
              for i, entry in enumerate(REPEATING * 2)]
    plain, _ = await constrained_outputs(llama_dir, tok_dir, params, pipeline_parallel_size=pp)
    spec, stats = await constrained_outputs(llama_dir, tok_dir, params, NGRAM, pipeline_parallel_size=pp)
    assert [[c.token_ids for c in o.outputs] for o in spec] == [[c.token_ids for c in o.outputs] for o in plain]
    assert_follow(spec)
    assert stats.spec_decode.num_drafts > 0 and stats.kv_blocks_used == 0
