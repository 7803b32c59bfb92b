"""Turns sampled tokens into sequence state: text, logprobs and finish decisions."""
from __future__ import annotations

from dataclasses import dataclass

from asyncpp.core.microbatch import PromptLogprobs
from asyncpp.core.outputs import CompletionOutput, Logprob, RequestOutput
from asyncpp.engine.detokenizer import IncrementalDetokenizer
from asyncpp.engine.sequence import Request, Sequence
from asyncpp.engine.stop_checker import find_stop, hold_back_length


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int, tokenizer=None):
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        """Prepare the sequence's detokenizer (once)."""
        if self.tokenizer is not None and seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids,
                skip_special_tokens=seq.request.params.skip_special_tokens)

    def append(self, seq: Sequence, sampled: SampledToken) -> None:
        """Add one token to seq and finish it when a stop condition holds."""
        params = seq.request.params
        token = sampled.token_id
        seq.output_token_ids.append(token)
        if params.logprobs is not None and sampled.logprob is not None:
            self._add_logprobs(seq, sampled)
        delta_len = self._detokenize(seq, token)
        n_out = len(seq.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return seq.finish("stop", token)
            if token in self.eos_token_ids and not params.ignore_eos:
                return seq.finish("stop", None)
            if params.stop and self._check_stop_strings(seq, delta_len):
                return
        if n_out >= seq.request.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    def _detokenize(self, seq: Sequence, token: int) -> int:
        if seq.detokenizer is None:
            return 0
        delta = seq.detokenizer.append(token)
        seq.text += delta
        return len(delta)

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> bool:
        params = seq.request.params
        hit = find_stop(seq.text, delta_len, params.stop, params.include_stop_str_in_output)
        if hit is None:
            return False
        seq.text, stop = hit
        seq.finish("stop", stop)
        return True

    def _add_logprobs(self, seq: Sequence, sampled: SampledToken) -> None:
        assert sampled.logprob is not None
        entry = {sampled.token_id: Logprob(sampled.logprob)}
        for rank, (tok, value) in enumerate(sampled.top_logprobs or [], start=1):
            entry.setdefault(tok, Logprob(value, rank=rank))
        if self.tokenizer is not None:
            for tok, logprob in entry.items():
                logprob.decoded_token = self.tokenizer.convert_ids_to_tokens(tok)
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled.logprob

    def add_prompt_logprobs(self, request: Request, first: int, chunk: PromptLogprobs) -> None:
        """A chunk's prompt logprobs, from prompt position `first` on (again after a
        preemption recomputed them: the same values)."""
        assert request.prompt_logprobs is not None
        for offset, (value, rank, top) in enumerate(zip(chunk.logprobs, chunk.ranks, chunk.top)):
            position = first + offset
            token = request.prompt_token_ids[position]
            entry = {token: Logprob(value, rank=rank)}
            for top_rank, (tok, top_value) in enumerate(top, start=1):
                entry.setdefault(tok, Logprob(top_value, rank=top_rank))
            if self.tokenizer is not None:
                for tok, logprob in entry.items():
                    logprob.decoded_token = self.tokenizer.convert_ids_to_tokens(tok)
            if request.prompt_logprobs[position] is None:
                request.prompt_logprobs_missing -= 1
            request.prompt_logprobs[position] = entry

    @staticmethod
    def _visible_text(seq: Sequence) -> str:
        """Text a user may see now: never a tail that may still become a stop string."""
        params = seq.request.params
        if seq.finished or not params.stop:
            return seq.text
        held = hold_back_length(seq.text, params.stop, params.include_stop_str_in_output)
        return seq.text[:len(seq.text) - held] if held else seq.text

    def request_output(self, request: Request) -> RequestOutput:
        want_logprobs = request.params.logprobs is not None
        outputs = [CompletionOutput(
            index=s.index, text=self._visible_text(s), token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob if want_logprobs else None,
            logprobs=list(s.logprobs or []) if want_logprobs else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs,
                             finished=request.finished, metrics=request.metrics,
                             num_cached_tokens=request.seqs[0].num_cached_tokens,
                             prompt_logprobs=request.prompt_logprobs)
