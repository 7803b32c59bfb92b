"""A request's structured-output constraint compiled into an xgrammar grammar for the model's
vocabulary: in a worker thread (never on the event loop), under a size limit and a deadline,
refusing JSON-schema features xgrammar would ignore, and cached by (kind, spec, options) in a
bounded LRU. Requests that bring the same spec while it compiles wait for that one compile.

A compile cannot be interrupted (xgrammar's C++): one past its deadline is refused but runs on
in its thread; at most `max_concurrent` compiles run at once (a thread holds its slot until its
compile ends, so late ones cannot pile up), and a spec that missed the deadline is refused at
once when it comes again."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
import xgrammar as xgr

from asyncpp.core.errors import InvalidRequest
from asyncpp.core.structured_outputs import StructuredOutputsParams
from asyncpp.engine.json_schema_check import unsupported_feature

MAX_ERROR_CHARS = 300
log = logging.getLogger("asyncpp")
CLOSE_WAIT_S = 30.0  # how long closing waits for a compile past its deadline


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    max_chars: int = 65536  # the spec's text
    timeout_s: float = 10.0
    cache_size: int = 256  # compiled grammars kept
    max_concurrent: int = 2  # compiles running at once
    max_whitespace: int | None = 20  # whitespace characters between two JSON tokens (0: none, None: any number)


class _Late(Exception):
    """A compile that got its slot after its caller's deadline."""


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], limits: GrammarLimits):
        """`stop_token_ids`: the tokens that end a sequence (a grammar allows them where it may end)."""
        self.limits = limits
        self._tokenizer, self._vocab_size, self._stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._xgr: xgr.GrammarCompiler | None = None  # built on first use: ~0.3 s over a 50k vocabulary
        self._setup = anyio.Lock()
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._late: OrderedDict[str, None] = OrderedDict()  # specs that missed the deadline
        self._running: dict[str, anyio.Event] = {}
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.num_compiled = 0

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    async def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The grammar for `params`, or InvalidRequest naming the field (too large, invalid,
        unsupported, or too slow to compile)."""
        spec = params.spec()
        if len(spec) > self.limits.max_chars:
            raise InvalidRequest(f"{params.param} is {len(spec)} characters long; this server compiles at most "
                                 f"{self.limits.max_chars} (--structured-outputs-max-chars)", param=params.param)
        key = _key(params, spec)
        while (running := self._running.get(key)) is not None:
            await running.wait()  # the same spec, compiling for another request
        if (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        if key in self._late:
            raise self._too_slow(params)
        self._running[key] = anyio.Event()
        try:
            compiled = await self._compile_with_deadline(params, spec, key)
        finally:
            self._running.pop(key).set()
        self._cache[key] = compiled
        while len(self._cache) > self.limits.cache_size:
            self._cache.popitem(last=False)
        return compiled

    async def aclose(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Waits (up to `timeout_s`) for compiles their callers gave up on: xgrammar cannot stop
        one, and one still running as the interpreter exits aborts the process."""
        if not await anyio.to_thread.run_sync(self._wait_idle, timeout_s):
            log.warning("a grammar compile past its deadline is still running as the engine closes")

    def _wait_idle(self, timeout_s: float) -> bool:
        deadline, taken = time.monotonic() + timeout_s, 0
        try:
            while taken < self.limits.max_concurrent and self._slots.acquire(
                    timeout=max(0.0, deadline - time.monotonic())):
                taken += 1
            return taken == self.limits.max_concurrent
        finally:
            for _ in range(taken):
                self._slots.release()

    async def _compile_with_deadline(self, params: StructuredOutputsParams, spec: str, key: str) -> xgr.CompiledGrammar:
        compiler = await self._compiler()
        deadline = time.monotonic() + self.limits.timeout_s
        with anyio.move_on_after(self.limits.timeout_s):
            try:
                return await anyio.to_thread.run_sync(self._compile_in_slot, compiler, params, spec, deadline,
                                                      abandon_on_cancel=True)
            except _Late:
                pass
        self._late[key] = None
        while len(self._late) > self.limits.cache_size:
            self._late.popitem(last=False)
        raise self._too_slow(params)

    async def _compiler(self) -> xgr.GrammarCompiler:
        async with self._setup:
            if self._xgr is None:
                self._xgr = await anyio.to_thread.run_sync(self._build_compiler)
        return self._xgr

    def _build_compiler(self) -> xgr.GrammarCompiler:
        info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                  stop_token_ids=self._stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # cached here, by spec

    def _too_slow(self, params: StructuredOutputsParams) -> InvalidRequest:
        return InvalidRequest(f"{params.param} did not compile within {self.limits.timeout_s:g} s "
                              "(--structured-outputs-timeout); simplify it", param=params.param)

    # -- in a worker thread --------------------------------------------------------------
    def _compile_in_slot(self, compiler: xgr.GrammarCompiler, params: StructuredOutputsParams, spec: str,
                         deadline: float) -> xgr.CompiledGrammar:
        with self._slots:  # held until the compile ends, even after its caller stopped waiting
            if time.monotonic() > deadline:
                raise _Late()
            try:
                compiled = compile_spec(compiler, params, spec, self.limits.max_whitespace)
            except InvalidRequest:
                raise
            except Exception as e:  # xgrammar's parse errors: the spec is at fault
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InvalidRequest(f"{params.param} is not a usable {_WHAT[params.kind]}: "
                                     f"{message[:MAX_ERROR_CHARS]}", param=params.param) from None
            self.num_compiled += 1
            return compiled


_WHAT = {"json": "JSON schema", "regex": "regular expression", "choice": "list of choices",
         "grammar": "grammar", "json_object": "JSON object constraint", "structural_tag": "structural tag"}


def compile_spec(compiler: xgr.GrammarCompiler, params: StructuredOutputsParams, spec: str,
                 max_whitespace: int | None = None) -> xgr.CompiledGrammar:
    """`params`' constraint compiled by xgrammar (raises what xgrammar raises on a bad spec).
    `max_whitespace` bounds each run of whitespace in JSON, as llama.cpp's JSON grammar does: a
    model sampling at temperature 1 can otherwise loop on newlines until max_tokens."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = json.loads(spec) if kind == "json" else {"type": "object"}
        if (why := unsupported_feature(schema)) is not None:
            raise InvalidRequest(f"{params.param} uses {why}, which the grammar engine (xgrammar) cannot enforce",
                                 param=params.param)
        compact = params.disable_any_whitespace or max_whitespace == 0
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=not compact,
                                            separators=(",", ":") if compact else None,
                                            max_whitespace_cnt=None if compact else max_whitespace)
    if kind == "regex":
        return compiler.compile_regex(spec)
    if kind == "choice":
        return compiler.compile_grammar(choice_grammar(params.choice or []))
    if kind == "grammar":
        return compiler.compile_grammar(spec) if is_ebnf(spec) else compiler.compile_grammar(
            xgr.Grammar.from_lark(spec))
    tag = json.loads(spec)
    if isinstance(tag, dict) and "structures" in tag:  # vLLM's older form: begin / schema / end and triggers
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                 for s in tag["structures"]]
        return compiler.compile_structural_tag(items, tag["triggers"])
    return compiler.compile_structural_tag(spec)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (as vLLM writes it)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

    def escape(text: str) -> str:
        return "".join(escapes.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                       for c in text)

    return "root ::= " + " | ".join(f'"{escape(c)}"' for c in choices)


def is_ebnf(grammar: str) -> bool:
    """EBNF (GBNF) defines rules with `::=`; anything else is read as Lark (as vLLM guesses)."""
    return any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def _key(params: StructuredOutputsParams, spec: str) -> str:
    text = f"{params.kind}\0{params.disable_any_whitespace}\0{spec}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
