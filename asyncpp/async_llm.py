"""AsyncLLM: the async engine's front. It starts the stages (through the supervisor) and one
loop per virtual engine, checks each request once, and hands it to the VE its router picks."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import anyio
from anyio.abc import TaskGroup
from xgrammar import CompiledGrammar

from asyncpp.auto_partition import cached_predictor
from asyncpp.core.config import EngineConfig
from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError
from asyncpp.core.outputs import RequestMetrics, RequestOutput
from asyncpp.core.placement import RankPlacement
from asyncpp.core.rebalance_rule import RebalancePolicy
from asyncpp.core.sampling_params import SamplingParams
from asyncpp.engine.draft_runner import DraftRunner
from asyncpp.engine.grammar_compiler import GrammarCompiler, GrammarLimits
from asyncpp.engine.grammar_state import GrammarState
from asyncpp.engine.live_move import MoveResult
from asyncpp.engine.output_processor import OutputProcessor
from asyncpp.engine.reasoning import REASONING_PARSERS, ReasoningMarkers, ReasoningTokens
from asyncpp.engine.rebalancer import Rebalancer, RebalanceStats
from asyncpp.engine.request_stream import RequestStream
from asyncpp.engine.router import Router
from asyncpp.engine.sequence import Request, Sequence
from asyncpp.engine.speculator import SpecDecodeStats
from asyncpp.engine.virtual_engine import VirtualEngine, VirtualEngineStats
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.executor.executor import Executor
from asyncpp.executor.stats import PipelineStats
from asyncpp.executor.supervisor import Supervisor
from asyncpp.prompts import ChatPrompt, PromptInput, PromptResolver, ResolvedPrompt
from asyncpp.worker.worker import RunnerFactory, default_runner_factory

log = logging.getLogger("asyncpp")


@dataclass(slots=True)
class EngineStats(VirtualEngineStats):
    """Every VE's counters summed (`VirtualEngine.snapshot()`), and the pipeline's."""
    pipeline: PipelineStats = field(default_factory=lambda: PipelineStats([], 0.0))
    layer_partition: list[float] = field(default_factory=list)  # the split serving now
    spec_decode: SpecDecodeStats | None = None  # with speculative_config
    rebalance: RebalanceStats = field(default_factory=RebalanceStats)  # live moves of the split

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class AsyncLLM:
    def __init__(self, model: str | None = None, *, engine_args: EngineArgs | None = None,
                 runner_factory: RunnerFactory = default_runner_factory, **engine_kwargs: Any):
        """Resolves the configuration now: a model or layout this engine cannot run raises
        ValueError here, before any stage starts. `runner_factory`: what each rank runs (a
        stand-in for the model in tests)."""
        self.args = engine_args or EngineArgs(model=model, **engine_kwargs)
        self._runner_factory = runner_factory
        self.config: EngineConfig = create_engine_config(self.args)
        self._prompts = PromptResolver(None, self.config.shape.vocab_size, self.config.max_model_len)
        self.grammars: GrammarCompiler | None = None  # with a tokenizer, once started
        self._reasoning: ReasoningTokens | None = None
        self._supervisor: Supervisor | None = None
        self._rebalancer: Rebalancer | None = None
        self._ves: list[VirtualEngine] = []
        self._router = Router(self.config)
        self._task_group: TaskGroup | None = None
        self._dead: BaseException | None = None
        self._started = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(engine_args=args)

    # -- lifecycle -----------------------------------------------------------------
    async def __aenter__(self) -> "AsyncLLM":
        if self.config.tokenizer_path is not None:
            self._prompts.tokenizer = await anyio.to_thread.run_sync(_load_tokenizer, self.config.tokenizer_path)
            self._start_structured_outputs(self._prompts.tokenizer)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        try:
            await self._start_executor()
        except BaseException:
            await self._close(None, None, None)  # shields the stages' shutdown itself
            raise
        self._started = True
        return self

    def _start_structured_outputs(self, tokenizer: Any) -> None:
        args = self.args
        limits = GrammarLimits(args.structured_outputs_max_chars, args.structured_outputs_timeout,
                               args.structured_outputs_cache_size, max_whitespace=self.max_json_whitespace)
        self.grammars = GrammarCompiler(tokenizer, self.config.shape.vocab_size, self.config.eos_token_ids, limits)
        if args.reasoning_parser is not None:
            self._reasoning = ReasoningTokens.of(REASONING_PARSERS[args.reasoning_parser], tokenizer)

    async def _start_executor(self) -> None:
        config = self.config
        spec = config.speculative
        draft = None
        if spec is not None and spec.model is not None:  # loaded first: a draft that fails starts no stage
            draft = await anyio.to_thread.run_sync(DraftRunner.for_target, config)
        self._supervisor = Supervisor(config, self._runner_factory)
        per_ve = await self._supervisor.start(self._task_group, self._blocks_per_ve)
        draft_blocks = 0
        if draft is not None:
            draft_blocks = draft.blocks_per_ve(per_ve)
            draft.init_kv_cache(config.num_virtual_engines, draft_blocks)
        log.info("microbatch token budget %d, %d prompt tokens while streams decode%s (%s); up to %d microbatch(es) "
                 "in flight per virtual engine", config.max_num_batched_tokens,
                 config.max_prefill_tokens_while_decoding,
                 ", then as measured step costs allow" if config.adaptive_prefill_budget else "",
                 "given" if self.args.max_num_batched_tokens or self.args.max_prefill_tokens_while_decoding
                 else "defaults", config.max_in_flight_per_ve)
        processor = OutputProcessor(config.eos_token_ids, config.max_model_len, self.tokenizer)
        self._ves = self._router.ves = [VirtualEngine(i, config, per_ve, self._supervisor, processor, self._router,
                                                      draft, draft_blocks)
                                        for i in range(config.num_virtual_engines)]
        for ve in self._ves:
            self._task_group.start_soon(self._serve, ve, name=f"virtual-engine-{ve.ve_id}")
        settings = config.rebalance
        self._rebalancer = Rebalancer(self._supervisor, self._ves, RebalancePolicy(threshold=settings.threshold),
                                      settings.window_s,
                                      cached_predictor(config) if settings.enabled else None)
        if settings.enabled:
            self._task_group.start_soon(self._rebalancer.run, name="asyncpp-rebalancer")

    async def _serve(self, ve: VirtualEngine) -> None:
        self._mark_dead(await ve.run())  # it returns only when the engine cannot serve again

    def _blocks_per_ve(self, total: int) -> int:
        config = self.config
        block_size, v = config.block_size, config.num_virtual_engines
        per_ve = total // v
        log.info("# KV blocks: %d (max tokens %d), %d per virtual engine x %d",
                 per_ve * v, per_ve * v * block_size, per_ve, v)
        if per_ve * block_size < config.max_model_len:
            memory = (f"--gpu-memory-utilization (now {config.gpu_memory_utilization})" if config.device == "cuda"
                      else f"--kv-cache-memory (now {self.args.kv_cache_memory})")
            raise ValueError(
                f"KV cache too small: each of the {v} virtual engines holds {per_ve * block_size} "
                f"tokens but max_model_len is {config.max_model_len}; raise {memory} or lower "
                "--max-model-len")
        return per_ve

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._close(*exc_info)

    async def _close(self, *exc_info: Any) -> bool | None:
        self._started = False
        if self._dead is None:
            self._dead = EngineDeadError("the engine was shut down", permanent=True)
        for ve in self._ves:
            ve.fail_all(self._dead)
        with anyio.CancelScope(shield=True):
            await self._prompts.aclose()
            if self._supervisor is not None:
                await self._supervisor.shutdown()
            if self.grammars is not None:
                await self.grammars.aclose()
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(*exc_info)

    def stop(self, error: EngineDeadError) -> int:
        """Refuse new requests and end every one running or waiting with `error` (their
        streams raise it): what a server does as it begins to shut down. Returns how many
        requests it ended. The stages stay up until the engine closes."""
        ended = len(self._router)
        self._mark_dead(error)
        return ended

    def _mark_dead(self, error: BaseException) -> None:
        if self._dead is None:
            if not (isinstance(error, EngineDeadError) and error.permanent):  # else the supervisor logged it
                log.error("engine failed for good: %s", error)
                error = EngineDeadError(str(error), permanent=True)
            self._dead = error
        for ve in self._ves:
            ve.fail_all(self._dead)

    # -- health and stats ----------------------------------------------------------
    def dead_error(self) -> BaseException | None:
        """Why requests are refused now: the engine is down for good, or restarting its
        stages after a failure (then healthy again); None while healthy."""
        if self._dead is None and self._supervisor is not None:
            return self._supervisor.error()
        return self._dead

    def is_healthy(self) -> bool:
        return self._started and self.dead_error() is None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, once started; None with skip_tokenizer_init."""
        return self._prompts.tokenizer

    @property
    def reasoning_markers(self) -> ReasoningMarkers | None:
        """The markers around the model's thinking, with --reasoning-parser."""
        parser = self.args.reasoning_parser
        return REASONING_PARSERS[parser] if parser is not None and self._reasoning is not None else None

    @property
    def max_json_whitespace(self) -> int | None:
        """Whitespace characters allowed between two JSON tokens of constrained output (None: any)."""
        most = self.args.structured_outputs_max_whitespace
        return None if most == -1 else most

    def starts_reasoning(self, prompt_token_ids: list[int]) -> bool:
        """Whether the output after this prompt begins inside the model's thinking."""
        return self._reasoning is not None and not self._reasoning.ended_in(prompt_token_ids)

    @property
    def model_name(self) -> str:
        return self.config.served_model_name

    def param_bytes_per_rank(self) -> list[int]:
        """Parameter bytes each rank loaded, by global rank (rank = pp_rank * T + tp_rank)."""
        return self._executor().param_bytes()

    def rank_pids(self) -> list[int]:
        """Each rank's process id, by global rank (the engine's own with the uni backend)."""
        return self._executor().rank_pids()

    async def start_template_renderers(self) -> None:
        """Start the processes that render the chat templates requests bring now, rather than
        at the first such request (the server does when it trusts request templates)."""
        await self._prompts.sandbox.start()

    def template_renderer_pids(self) -> list[int]:
        """The chat-template renderer processes alive now."""
        return self._prompts.sandbox.pids()

    def placement(self) -> list[RankPlacement]:
        """Each rank's node (Ray node id and address; this host outside Ray), its network
        interface, and how its stage receives the previous stage's tensors (shm, gloo,
        nccl), by global rank."""
        return self._executor().placement()

    def _executor(self) -> Executor:
        if self._supervisor is None or self._supervisor.executor is None:
            raise EngineDeadError("the engine is not running (use `async with AsyncLLM(...)`)", permanent=True)
        return self._supervisor.executor

    def stats(self) -> EngineStats:
        snapshots = [ve.snapshot() for ve in self._ves]
        sums = {f.name: sum(getattr(s, f.name) for s in snapshots) for f in fields(VirtualEngineStats)}
        executor = self._supervisor.executor if self._supervisor else None
        serving = self._supervisor.config if self._supervisor else self.config
        moves = self._rebalancer.stats if self._rebalancer else RebalanceStats()
        return EngineStats(**sums, pipeline=executor.stats() if executor else PipelineStats([], 0.0),
                           layer_partition=list(serving.layer_partition), rebalance=replace(moves),
                           spec_decode=self._spec_decode_stats())

    def _spec_decode_stats(self) -> SpecDecodeStats | None:
        spec = self.config.speculative
        if spec is None:
            return None
        total = SpecDecodeStats(accepted_per_position=[0] * spec.num_speculative_tokens)
        for ve in self._ves:
            if (stats := ve.spec_decode_stats()) is not None:
                total.add(stats)
        return total

    async def repartition(self, parts: list[float]) -> MoveResult:
        """Move the stage boundaries to `parts` now, as --pp-rebalance does on its own: the
        pipeline pauses and drains, the stages whose layers change build them in place, running
        requests re-prefill, and serving resumes. No request fails; `moved` is False (the old
        split still serving) when a stage cannot build its new layers or fails meanwhile."""
        if self._rebalancer is None or not self._started:
            raise EngineDeadError("the engine is not running (use `async with AsyncLLM(...)`)", permanent=True)
        return await self._rebalancer.move(parts)

    # -- requests ------------------------------------------------------------------
    async def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                          request_id: str | None = None) -> RequestStream:
        """Check the request (once, here), resolve its prompt off the event loop, and enqueue
        it; iterate the returned stream for cumulative outputs. Closing the stream (or
        cancelling its consumer) aborts the request."""
        params = params or SamplingParams()
        self._check_accepting()
        params.verify_for_model(self.config.shape.vocab_size, self.config.max_logprobs, self.config.max_num_seqs)
        resolved = await self._prompts.resolve(prompt)
        grammar = None
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InvalidRequest("structured_outputs need a tokenizer (the engine runs with "
                                     "skip_tokenizer_init=True)", param="structured_outputs")
            grammar = await self.grammars.compile(params.structured_outputs)
        return self._enqueue(request_id or uuid.uuid4().hex, resolved, params, grammar)

    async def tokenize(self, prompt: str | ChatPrompt, add_special_tokens: bool = True) -> list[int]:
        """A text's or a chat's token ids, off the event loop (no check against the model)."""
        return await self._prompts.tokenize(prompt, add_special_tokens)

    def _check_accepting(self) -> None:
        if not self._started:
            raise EngineDeadError("the engine is not running (use `async with AsyncLLM(...)`)", permanent=True)
        if (error := self.dead_error()) is not None:  # a new exception each time: a raised one keeps its traceback
            raise EngineDeadError(str(error), permanent=getattr(error, "permanent", False))

    def _enqueue(self, request_id: str, prompt: ResolvedPrompt, params: SamplingParams,
                 grammar: CompiledGrammar | None = None) -> RequestStream:
        self._check_accepting()  # again: the engine may have failed while the prompt was resolved
        if request_id in self._router:
            raise InvalidRequest(f"request_id {request_id!r} is already running")
        if self._num_waiting() >= self.config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} "
                                 "requests); retry later")
        room = self.config.max_model_len - len(prompt.token_ids)  # > 0: the resolver saw to it
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, prompt.text, prompt.token_ids, params, max_tokens,
                          RequestMetrics(arrival_time=time.monotonic()), prompt.cache_salt)
        thinking = grammar is not None and self._reasoning is not None and not self._reasoning.ended_in(
            prompt.token_ids)
        request.seqs = [Sequence(request, i, prompt.token_ids, grammar=self._grammar_state(grammar, thinking))
                        for i in range(params.n)]
        stream = RequestStream(request_id, self._abort)
        self._router.route(request_id, request.seqs[0]).add(request, stream)
        return stream

    def _grammar_state(self, grammar: CompiledGrammar | None, thinking: bool) -> GrammarState | None:
        """A sequence's own grammar state; it waits while the model reasons (`thinking`: the prompt
        leaves reasoning open under --reasoning-parser)."""
        if grammar is None:
            return None
        return GrammarState(grammar, self._reasoning.end if self._reasoning else (), reasoning=thinking)

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (as vLLM's reset_prefix_cache); returns how many
        cached, unused blocks that freed. Running requests keep the blocks they hold."""
        return sum(ve.reset_prefix_cache() for ve in self._ves)

    def _num_waiting(self) -> int:
        return sum(ve.num_waiting for ve in self._ves)

    async def generate(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        async with await self.add_request(prompt, sampling_params, request_id) as stream:
            async for output in stream:
                yield output

    async def abort(self, request_id: str) -> bool:
        """End the request now (finish_reason "abort") and free its KV blocks; False if unknown."""
        return self._abort(request_id)

    def _abort(self, request_id: str) -> bool:
        ve = self._router.take(request_id)
        return ve.abort(request_id) if ve is not None else False


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"no usable tokenizer at {path} ({e}); pass skip_tokenizer_init=True "
                         "to send token ids instead of text") from e
