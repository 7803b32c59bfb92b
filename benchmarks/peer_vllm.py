"""The vLLM peer of benchmarks/throughput.py: the same token-id prompts through vLLM's
offline LLM, in a child process on vLLM's own interpreter (peer_vllm_child.py), which gets
the prompts in a JSON file and writes the timing and token ids back."""
from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncpp.bench import SystemResult, Workload, median_run

CHILD = Path(__file__).resolve().with_name("peer_vllm_child.py")
_STDERR_TAIL = 2000


def run_vllm(python: str, model: str, prompts: list[list[int]], output_len: int, cores: int,
             repeats: int = 1) -> SystemResult:
    """All prompts at once, `repeats` timed runs on one engine -> the median run."""
    job = {"model": model, "prompts": prompts, "output_len": output_len, "cores": cores, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="asyncpp-vllm-") as tmp:
        job_path, result_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([python, str(CHILD), str(job_path), str(result_path)], cwd=tmp,
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


@dataclass(slots=True, frozen=True)
class VLLMPeer:
    python: str  # an interpreter with vLLM installed

    def __call__(self, workload: Workload, notes: list[str], log: Any) -> SystemResult:
        log(f"[bench] vLLM via {self.python} ...")
        vllm = run_vllm(self.python, workload.model, workload.prompts, workload.output_len, workload.cores,
                        workload.repeats)
        notes.append(f"{vllm.name}: {vllm.note}" if vllm.ok else f"vLLM skipped: {vllm.error}")
        return vllm
