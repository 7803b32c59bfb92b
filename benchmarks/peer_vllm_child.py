"""The vLLM side of benchmarks/peer_vllm.py: runs in vLLM's own interpreter (its venv pins
its own torch and transformers), so it imports only the standard library and vLLM, never
asyncpp.

    VLLM_VENV/bin/python benchmarks/peer_vllm_child.py JOB.json RESULT.json

JOB.json: model, prompts (token ids), output_len, cores, repeats, dtype, pipeline_parallel_size. RESULT.json: vLLM's
version, the seconds of each timed run and the token ids.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WARMUP_PROMPT_LEN, WARMUP_TOKENS = 16, 4


def configure_environment(cores: int, stages: int = 1) -> None:
    # Every core for vLLM's workers, as asyncpp and HF get, split evenly between the pipeline
    # stages ('|' between ranks); vLLM's default ("auto") keeps one core back for its
    # scheduler, which on a small machine halves the worker.
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    per = max(1, len(cpus) // stages)
    groups = [cpus[i * per:(i + 1) * per] or cpus[-1:] for i in range(stages)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(",".join(map(str, g)) for g in groups))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB, ample for the bench workloads
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(job: dict) -> dict:
    import vllm  # after configure_environment: vLLM reads its environment on import
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    stages = job.get("pipeline_parallel_size", 1)
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), enable_prefix_caching=False,
              skip_tokenizer_init=True, seed=0, pipeline_parallel_size=stages,
              distributed_executor_backend="mp" if stages > 1 else None)
    # Two warm-up prompts, not one: torch.compile specializes a batch of 1, and the timed run
    # would then pay for compiling the general shape (measured on W: 365 tok/s after one, 493 after two).
    warmup = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p[:WARMUP_PROMPT_LEN]) for p in job["prompts"][:2]], warmup,
                 use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    times, token_ids = [], None
    for _ in range(job.get("repeats", 1)):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        # Only fp32 greedy decoding is expected to repeat exactly; vLLM's bf16 kernels do not.
        if token_ids is not None and ids != token_ids and job.get("dtype", "float32") == "float32":
            raise RuntimeError("vLLM gave different greedy token ids in two runs of the same prompts")
        token_ids = ids
    return {"version": vllm.__version__, "total_s": times, "token_ids": token_ids}


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    configure_environment(job["cores"], job.get("pipeline_parallel_size", 1))
    Path(result_path).write_text(json.dumps(run(job)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
