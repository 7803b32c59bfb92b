"""Structured output without an engine: the request's constraint, the grammar compiler (cache,
limits, deadline), one sequence's grammar state, and the sampler's masking."""
from __future__ import annotations

import json
import time

import anyio
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from asyncpp.core.errors import InvalidRequest
from asyncpp.core.microbatch import SampleSpec
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.core.structured_outputs import StructuredOutputsParams
from asyncpp.engine import grammar_compiler
from asyncpp.engine.grammar_compiler import GrammarCompiler, GrammarLimits, choice_grammar, is_ebnf
from asyncpp.engine.grammar_state import GrammarState
from asyncpp.engine.json_schema_check import unsupported_feature
from asyncpp.engine.reasoning import REASONING_PARSERS, ReasoningTokens
from asyncpp.testing.tiny_tokenizer import VOCAB_SIZE, make_tokenizer
from asyncpp.worker.sampler import Sampler

EOS = 2
WORDS = -(-VOCAB_SIZE // 32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def compiler(tokenizer, **limits) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB_SIZE, [EOS], GrammarLimits(**limits))


def allowed(state: GrammarState) -> set[int]:
    bitmask = np.zeros((1, WORDS), dtype=np.int32)
    state.fill_mask(bitmask, 0)
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:VOCAB_SIZE]
    return set(np.flatnonzero(bits).tolist())


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# -- the request's constraint ------------------------------------------------------------------

def test_params_take_exactly_one_constraint_and_name_the_field():
    assert StructuredOutputsParams.of({"regex": "a+"}).kind == "regex"
    assert SamplingParams(structured_outputs={"json": {"type": "object"}}).structured_outputs.kind == "json"
    cases = [({}, "structured_outputs"), ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
             ({"json": "{not json"}, "structured_outputs.json"), ({"choice": []}, "structured_outputs.choice"),
             ({"regex": ""}, "structured_outputs.regex"), ({"grammar": "x\x00"}, "structured_outputs.grammar"),
             ({"json_object": False}, "structured_outputs.json_object"), ({"regexp": "a"}, "structured_outputs"),
             ({"regex": "a", "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern")]
    for fields, param in cases:
        with pytest.raises(InvalidRequest) as info:
            SamplingParams(structured_outputs=fields)
        assert info.value.param == param, fields


def test_schema_features_xgrammar_would_ignore_are_named():
    assert unsupported_feature({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}) is None
    assert unsupported_feature({"type": "integer", "multipleOf": 3}) == "multipleOf"
    assert "uniqueItems" in unsupported_feature({"type": "array", "uniqueItems": True})
    assert "format" in unsupported_feature({"type": "string", "format": "credit-card"})
    assert "allOf" in unsupported_feature({"allOf": [{"type": "string"}, {"enum": ["a"]}]})
    nested: dict = {"type": "integer"}
    for _ in range(70):
        nested = {"type": "array", "items": nested}
    assert "nesting" in unsupported_feature(nested)


def test_choices_and_grammar_syntax():
    assert choice_grammar(['say "hi"', "a\nb"]) == 'root ::= "say \\"hi\\"" | "a\\nb"'
    assert is_ebnf('root ::= "a"') and not is_ebnf('start: "a"  # no ::= here')


# -- the compiler ---------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_compiles_once_per_spec_and_keeps_a_bounded_cache(tokenizer):
    grammars = compiler(tokenizer, cache_size=3)
    same = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    async with anyio.create_task_group() as tg:  # arriving together: one compile, the others wait for it
        for _ in range(5):
            tg.start_soon(grammars.compile, same)
    assert grammars.num_compiled == 1
    for n in range(6):
        await grammars.compile(StructuredOutputsParams(regex=f"[a-z]{{{n + 1}}}"))
    assert grammars.num_compiled == 7 and grammars.num_cached == 3
    await grammars.compile(StructuredOutputsParams(regex="[a-z]{6}"))  # the newest stays
    assert grammars.num_compiled == 7


@pytest.mark.anyio
@pytest.mark.parametrize("fields,param,words", [
    ({"json": {"type": "strnig"}}, "structured_outputs.json", "JSON schema"),
    ({"json": {"type": "number", "multipleOf": 2}}, "structured_outputs.json", "multipleOf"),
    ({"regex": "(ab"}, "structured_outputs.regex", "regular expression"),
    ({"grammar": 'root ::= "a" | '}, "structured_outputs.grammar", "grammar"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "nonsense"}}},
     "structured_outputs.structural_tag", "structural tag"),
    ({"regex": "a" * 101}, "structured_outputs.regex", "at most 100"),
])
async def test_bad_specs_are_refused_naming_the_field(tokenizer, fields, param, words):
    with pytest.raises(InvalidRequest) as info:
        await compiler(tokenizer, max_chars=100).compile(StructuredOutputsParams(**fields))
    assert info.value.param == param and words in str(info.value)


@pytest.mark.anyio
async def test_a_compile_past_its_deadline_is_refused_and_not_retried(tokenizer, monkeypatch):
    real = grammar_compiler.compile_spec

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    grammars = compiler(tokenizer, timeout_s=0.2, max_concurrent=1)
    await grammars.compile(StructuredOutputsParams(choice=["warm"]))  # builds the vocabulary, compiles
    monkeypatch.setattr(grammar_compiler, "compile_spec", slow)
    for attempt in range(2):
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match="did not compile within 0.2 s") as info:
            await grammars.compile(StructuredOutputsParams(regex="slow"))
        assert info.value.param == "structured_outputs.regex" and time.monotonic() - started < 0.9, attempt
    assert grammars.num_compiled == 1  # the second attempt was refused unseen
    await grammars.aclose(timeout_s=30)  # the abandoned compile ends before the test does
    assert grammars.num_compiled == 2


# -- one sequence's grammar -------------------------------------------------------------------------

@pytest.mark.anyio
async def test_grammar_state_advances_masks_rolls_back_and_terminates(tokenizer):
    compiled = await compiler(tokenizer).compile(StructuredOutputsParams(choice=["red", "blue"]))
    state = GrammarState(compiled)
    first = allowed(state)
    assert first and all(tokenizer.decode([t]) in ("r", "re", "red", "b", "bl", "blu", "blue") for t in first)
    assert state.advance(ids(tokenizer, "blue")) and allowed(state) == {EOS}
    state.rollback(state.num_accepted)
    assert allowed(state) == first
    assert not state.advance(ids(tokenizer, "green"))
    assert state.advance(ids(tokenizer, "red") + [EOS]) and state.terminated and not state.constrains
    with pytest.raises(ValueError):
        state.rollback(10)


@pytest.mark.anyio
async def test_the_grammar_waits_until_the_reasoning_ends(tokenizer):
    compiled = await compiler(tokenizer).compile(StructuredOutputsParams(choice=["yes"]))
    marks = ReasoningTokens.of(REASONING_PARSERS["qwen3"], tokenizer)
    assert len(marks.end) > 1  # the tiny vocabulary spells </think> in pieces
    thinking = ids(tokenizer, "Let me think.")
    assert not marks.ended_in(thinking) and marks.ended_in(thinking + list(marks.end))
    assert not marks.ended_in(list(marks.end) + list(marks.start) + thinking)
    state = GrammarState(compiled, marks.end, reasoning=True)
    assert not state.constrains and state.advance(thinking + list(marks.end)[:-1]) and state.reasoning
    assert state.advance(list(marks.end)[-1:]) and state.constrains and state.num_accepted == 0
    assert state.advance(ids(tokenizer, "yes") + [EOS]) and state.terminated


@pytest.mark.anyio
async def test_a_proposal_is_cut_at_the_first_token_the_grammar_forbids(tokenizer):
    compiled = await compiler(tokenizer).compile(StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"))
    state = GrammarState(compiled)
    state.advance(ids(tokenizer, "1"))
    first = allowed(state)
    assert state.valid_prefix(ids(tokenizer, "23x-ab")) == 2  # "x" where "-" must come
    assert state.valid_prefix(ids(tokenizer, "23-ab")) == 5
    # The stop token that completes the grammar is left to the row before it: no row after the end.
    assert state.valid_prefix(ids(tokenizer, "23-ab") + [EOS, EOS]) == 5
    assert state.valid_prefix([EOS]) == 0
    assert state.num_accepted == 1 and allowed(state) == first and not state.terminated
    assert state.advance(ids(tokenizer, "23-ab") + [EOS]) and state.valid_prefix([EOS]) == 0


@pytest.mark.anyio
async def test_each_verified_row_gets_the_mask_after_the_proposal_before_it(tokenizer):
    compiled = await compiler(tokenizer).compile(StructuredOutputsParams(choice=["red", "blue"]))
    state, walker = GrammarState(compiled), GrammarState(compiled)
    proposal = ids(tokenizer, "blue")
    bitmask = np.zeros((1 + len(proposal), WORDS), dtype=np.int32)
    state.fill_masks(bitmask, 0, proposal)
    for i in range(len(proposal) + 1):
        row = np.zeros((1, WORDS), dtype=np.int32)
        walker.fill_mask(row, 0)
        assert (bitmask[i] == row[0]).all()
        walker.advance(proposal[i:i + 1])
    assert bitmask[-1].any() and state.num_accepted == 0 and allowed(state) == allowed(GrammarState(compiled))
    with pytest.raises(RuntimeError):
        state.fill_masks(bitmask, 0, ids(tokenizer, "bed"))
    assert state.num_accepted == 0 and state.advance(ids(tokenizer, "red") + [EOS]) and state.terminated


@pytest.mark.anyio
async def test_a_proposal_while_reasoning_stops_before_the_end_of_reasoning(tokenizer):
    compiled = await compiler(tokenizer).compile(StructuredOutputsParams(choice=["yes"]))
    marks = ReasoningTokens.of(REASONING_PARSERS["qwen3"], tokenizer)
    state = GrammarState(compiled, marks.end, reasoning=True)
    thinking, end = ids(tokenizer, "Let me think."), list(marks.end)
    # Unchecked while reasoning (not "yes"), up to the marker's last token: the row after it is the grammar's.
    assert state.valid_prefix(thinking + end + ids(tokenizer, "no")) == len(thinking) + len(end) - 1
    state.advance(thinking + end[:1])
    rest = end[1:]
    assert state.valid_prefix(rest + ids(tokenizer, "yes")) == len(rest) - 1
    assert state.reasoning and state.advance(rest) and state.constrains


# -- the sampler --------------------------------------------------------------------------------------

def bitmask_of(rows: list[set[int]], vocab: int) -> np.ndarray:
    bits = np.zeros((len(rows), -(-vocab // 32) * 32), dtype=np.uint8)
    for r, tokens in enumerate(rows):
        bits[r, sorted(tokens)] = 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


def test_sampler_keeps_each_constrained_row_to_its_grammar():
    vocab = 40
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    rows = [{3, 7}, {11}, set(range(20, 30))]
    bitmask = bitmask_of(rows, vocab)
    specs = [SampleSpec(SamplingParams(temperature=0), None, 0, grammar_row=0),
             SampleSpec(SamplingParams(temperature=0), None, 0),  # unconstrained: untouched
             SampleSpec(SamplingParams(temperature=1.0, logprobs=2), None, 0, grammar_row=2),
             SampleSpec(SamplingParams(temperature=1.0), None, 0, grammar_row=1)]
    for _ in range(20):
        out = Sampler(vocab)(logits, specs, bitmask)
        assert out.token_ids[0] == max(rows[0], key=lambda t: logits[0, t]) and out.token_ids[1] == logits[1].argmax()
        assert out.token_ids[2] in rows[2] and out.token_ids[3] == 11
    masked = logits[2].masked_fill(~torch.isin(torch.arange(vocab), torch.tensor(sorted(rows[2]))), float("-inf"))
    expected = masked.log_softmax(-1)  # logprobs of the masked distribution, as vLLM
    assert out.logprobs[2] == pytest.approx(expected[out.token_ids[2]].item(), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[2]] == expected.topk(2).indices.tolist()


def test_min_tokens_yields_to_a_grammar_that_must_end():
    vocab = 16
    logits = torch.zeros(2, vocab)
    logits[:, 5] = 3.0
    specs = [SampleSpec(SamplingParams(temperature=0), None, 0, [EOS, 5], grammar_row=0),
             SampleSpec(SamplingParams(temperature=0), None, 0, [EOS], grammar_row=1)]
    out = Sampler(vocab)(logits, specs, bitmask_of([{EOS}, {EOS, 5, 9}], vocab))
    assert out.token_ids == [EOS, 5]  # only the end is left: it wins; else the blocked EOS stays blocked


def test_a_schema_spec_keeps_its_property_order():
    spec = StructuredOutputsParams(json={"b": 1, "a": 2}).spec()
    assert list(json.loads(spec)) == ["b", "a"]  # property order kept: xgrammar follows it
