"""The vLLM peer of `asyncpp bench`: the same token-id prompts through vLLM's offline LLM.

vLLM pins its own torch and transformers, so it usually lives in a venv of its own. The
bench runs this file as a script with that venv's interpreter (`--vllm-python`), hands it
the prompts in a JSON file and reads the timing and token ids back:

    <vllm-python> asyncpp/bench_vllm.py JOB.json RESULT.json

Run that way, this file imports nothing from asyncpp (only the standard library and vLLM).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_WARMUP_PROMPT_LEN, _WARMUP_TOKENS = 16, 4
_STDERR_TAIL = 2000


def run_vllm(python: str, model: str, prompts: list[list[int]], output_len: int, cores: int,
             repeats: int = 1) -> Any:
    """vLLM in a child process (its own interpreter), all prompts at once, `repeats` timed
    runs on one engine -> the median run's SystemResult."""
    from asyncpp.bench import SystemResult, median_run

    job = {"model": model, "prompts": prompts, "output_len": output_len, "cores": cores, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="asyncpp-vllm-") as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([python, __file__, str(job_path), str(result_path)], cwd=tmp,
                                  capture_output=True, text=True)
        except OSError as exc:
            return SystemResult(name="vLLM", kind="vllm", error=f"cannot start {python}: {exc}")
        if proc.returncode != 0 or not result_path.exists():
            tail = proc.stderr.strip()[-_STDERR_TAIL:].splitlines()[-1:] or ["no output"]
            return SystemResult(name="vLLM", kind="vllm", error=f"{python} exited {proc.returncode}: {tail[0]}")
        data = json.loads(result_path.read_text())
    ids = data["token_ids"]
    runs = [SystemResult(name=f"vLLM {data['version']}", kind="vllm", requests=len(ids),
                         output_tokens=sum(map(len, ids)), total_s=total_s, token_ids=ids,
                         note="offline LLM.generate(): no per-token timestamps, so no TTFT/ITL")
            for total_s in data["total_s"]]
    return median_run(runs)


# -- the child side: runs in vLLM's interpreter ----------------------------------------
def _configure_environment(cores: int) -> None:
    # Every core for vLLM's one worker, as asyncpp P=1 and HF get; vLLM's default ("auto")
    # keeps one core back for its scheduler, which on a small machine halves the worker.
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB, ample for the bench workloads
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _child(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    _configure_environment(job["cores"])
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype="float32", enable_prefix_caching=False, skip_tokenizer_init=True, seed=0)
    # Two warm-up prompts, not one: torch.compile specializes a batch of 1, and the timed run
    # would then pay for compiling the general shape (measured on W: 365 tok/s after one, 493 after two).
    warmup = SamplingParams(temperature=0.0, max_tokens=_WARMUP_TOKENS, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p[:_WARMUP_PROMPT_LEN]) for p in job["prompts"][:2]], warmup,
                 use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=job["output_len"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    times, token_ids = [], None
    for _ in range(job.get("repeats", 1)):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        if token_ids is not None and ids != token_ids:
            raise RuntimeError("vLLM gave different greedy token ids in two runs of the same prompts")
        token_ids = ids
    result = {"version": vllm.__version__, "total_s": times, "token_ids": token_ids}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
