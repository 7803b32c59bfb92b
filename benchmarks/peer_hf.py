"""The Hugging Face peer of benchmarks/throughput.py: transformers generate() on the same
token-id prompts, greedy, one request at a time."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from asyncpp.bench import RequestTrace, SystemResult, Workload, summarize

WARMUP_PROMPT_LEN, WARMUP_TOKENS = 16, 4


class ArrivalStreamer(BaseStreamer):
    """Timestamps each generated token into a trace (generate()'s first put is the prompt)."""

    def __init__(self, trace: RequestTrace) -> None:
        self.trace, self.seen_prompt, self.count = trace, False, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.count += value.numel()
        self.trace.record(time.perf_counter(), self.count)

    def end(self) -> None:
        pass


def hf_generate(model: Any, prompt: list[int], output_len: int, trace: RequestTrace | None) -> list[int]:
    ids = torch.tensor([prompt])
    streamer = ArrivalStreamer(trace) if trace is not None else None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=output_len, eos_token_id=None, pad_token_id=0,
                             streamer=streamer)  # runs through EOS like ignore_eos, never suppresses it
    return out[0, len(prompt):].tolist()


def run_hf(model_path: str, prompts: list[list[int]], output_len: int, threads: int) -> SystemResult:
    """generate(), greedy, one request at a time after one warm-up (TTFT excludes queueing)."""
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    hf_generate(model, prompts[0][:WARMUP_PROMPT_LEN], WARMUP_TOKENS, None)
    traces = [RequestTrace() for _ in prompts]
    start = time.perf_counter()
    for prompt, trace in zip(prompts, traces):
        trace.start = time.perf_counter()
        trace.token_ids = hf_generate(model, prompt, output_len, trace)
    return summarize("HF generate", "hf", traces, time.perf_counter() - start)


@dataclass(slots=True, frozen=True)
class HFPeer:
    """The first `requests` prompts (None: all), with `threads` torch threads (None: every core)."""
    requests: int | None = None
    threads: int | None = None

    def count(self, num_prompts: int) -> int:
        return num_prompts if self.requests is None else min(self.requests, num_prompts)

    def __call__(self, workload: Workload, notes: list[str], log: Any) -> SystemResult:
        total = len(workload.prompts)
        count = self.count(total)
        log(f"[bench] HF generate, {count} request(s) one at a time ...")
        hf = run_hf(workload.model, workload.prompts[:count], workload.output_len, self.threads or workload.cores)
        if count < total:
            hf.name = f"HF generate ({count}/{total} req)"
            notes.append(f"HF timed {count} of {total} requests: its tok/s is per-request normalized "
                         f"(all {total} would take ~{hf.total_s * total / count:.1f} s)")
        return hf


def add_speedup_vs_hf(results: list[SystemResult]) -> None:
    hf = next((r for r in results if r.ok and r.kind == "hf"), None)
    if hf is None or hf.tokens_per_s <= 0:
        return
    for r in results:
        if r.ok:
            r.speedup_vs_hf = r.tokens_per_s / hf.tokens_per_s
