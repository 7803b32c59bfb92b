"""The vLLM peer of benchmarks/throughput.py: the same token-id prompts through vLLM's
offline LLM, in a child process on vLLM's own interpreter (peer_vllm_child.py), which gets
the prompts in a JSON file and writes the timing and token ids back."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncpp.bench import Layout, SystemResult, Workload, median_run

CHILD = Path(__file__).resolve().with_name("peer_vllm_child.py")
_STDERR_TAIL = 2000


def run_vllm(python: str, model: str, prompts: list[list[int]], output_len: int, cores: int,
             repeats: int = 1, layout: Layout = Layout()) -> SystemResult:
    """All prompts at once, `repeats` timed runs on one engine -> the median run. `layout`:
    its pipeline stages and dtype (vLLM's CPU backend has no fp8 KV or int8 here)."""
    job = {"model": model, "prompts": prompts, "output_len": output_len, "cores": cores, "repeats": repeats,
           "dtype": layout.precision.dtype or "float32", "pipeline_parallel_size": layout.pp}
    with tempfile.TemporaryDirectory(prefix="asyncpp-vllm-") as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([python, str(CHILD), str(job_path), str(result_path)], cwd=tmp,
                                  capture_output=True, text=True, env=child_env(python))
        except OSError as exc:
            return SystemResult(name="vLLM", kind="vllm", error=f"cannot start {python}: {exc}")
        if proc.returncode != 0 or not result_path.exists():
            tail = proc.stderr.strip()[-_STDERR_TAIL:].splitlines()[-1:] or ["no output"]
            return SystemResult(name="vLLM", kind="vllm", error=f"{python} exited {proc.returncode}: {tail[0]}")
        data = json.loads(result_path.read_text())
    ids = data["token_ids"]
    runs = [SystemResult(name=f"vLLM {data['version']} {layout.name}", kind="vllm", requests=len(ids),
                         precision=layout.precision.label,
                         output_tokens=sum(map(len, ids)), total_s=total_s, token_ids=ids,
                         note="offline LLM.generate(): no per-token timestamps, so no TTFT/ITL")
            for total_s in data["total_s"]]
    return median_run(runs)


def child_env(python: str) -> dict[str, str]:
    """vLLM's CPU build wants torch's libgomp loaded first (its OpenMP thread binding)."""
    venv = Path(python).absolute().parents[1]  # not resolve(): the venv's python links out of it
    gomp = next(venv.glob("lib/python3*/site-packages/torch/lib/libgomp.so.1"), None)
    return {**os.environ, "LD_PRELOAD": str(gomp)} if gomp else dict(os.environ)


@dataclass(slots=True, frozen=True)
class VLLMPeer:
    python: str  # an interpreter with vLLM installed
    layout: Layout = Layout()  # stages and dtype; the rest is vLLM's

    def __call__(self, workload: Workload, notes: list[str], log: Any) -> SystemResult:
        log(f"[bench] vLLM {self.layout.name} via {self.python} ...")
        vllm = run_vllm(self.python, workload.model, workload.prompts, workload.output_len, workload.cores,
                        workload.repeats, self.layout)
        notes.append(f"{vllm.name}: {vllm.note}" if vllm.ok else f"vLLM skipped: {vllm.error}")
        return vllm
