"""The vLLM peer's plumbing, with a stand-in `vllm` package (the real one needs its own venv)."""
import sys
import textwrap

from asyncpp.bench import Workload
from benchmarks.peer_vllm import CHILD, VLLMPeer, run_vllm

FAKE_VLLM = textwrap.dedent('''
    import sys

    __version__ = "0.0-fake"

    class SamplingParams:
        def __init__(self, temperature, max_tokens, ignore_eos):
            self.max_tokens = max_tokens

    class _Completion:
        def __init__(self, ids):
            self.token_ids = ids

    class _Output:
        def __init__(self, ids):
            self.outputs = [_Completion(ids)]

    class LLM:
        def __init__(self, model, **kwargs):
            assert kwargs["dtype"] == "float32" and kwargs["skip_tokenizer_init"]
            # the child runs in vLLM's venv, where asyncpp is not installed
            assert not [m for m in sys.modules if m.split(".")[0] in ("asyncpp", "benchmarks")]

        def generate(self, prompts, params, use_tqdm):
            # "greedy" stand-in: continue each prompt with its last id + 1, + 2, ...
            return [_Output([p["prompt_token_ids"][-1] + i + 1 for i in range(params.max_tokens)]) for p in prompts]
''')


def _fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text(
        "def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_the_child_script_lives_under_benchmarks():
    assert CHILD.parent.name == "benchmarks" and CHILD.is_file()


def test_vllm_peer_reports_tokens_and_time(tmp_path, monkeypatch):
    _fake_vllm(tmp_path, monkeypatch)
    result = run_vllm(sys.executable, "/some/model", [[5, 6], [7]], output_len=3, cores=1, repeats=3)
    assert result.ok, result.error
    assert len(result.runs_tok_s) == 3
    assert result.name == "vLLM 0.0-fake P=1" and result.kind == "vllm"  # the layout it ran (default P=1, fp32)
    assert result.token_ids == [[7, 8, 9], [8, 9, 10]]
    assert result.output_tokens == 6 and result.requests == 2 and result.total_s > 0


def test_vllm_peer_adds_its_row_and_a_note(tmp_path, monkeypatch):
    _fake_vllm(tmp_path, monkeypatch)
    notes: list[str] = []
    workload = Workload("/some/model", [[5]], output_len=2, repeats=1, cores=1)
    result = VLLMPeer(sys.executable)(workload, notes, lambda *_: None)
    assert result.ok and result.token_ids == [[6, 7]]
    assert notes == ["vLLM 0.0-fake P=1: offline LLM.generate(): no per-token timestamps, so no TTFT/ITL"]


def test_vllm_peer_without_vllm_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no vllm there
    result = run_vllm(sys.executable, "/some/model", [[5]], output_len=1, cores=1)
    assert not result.ok and "ModuleNotFoundError" in result.error


def test_vllm_peer_with_a_missing_interpreter(tmp_path):
    result = run_vllm(str(tmp_path / "no-python"), "/some/model", [[5]], output_len=1, cores=1)
    assert not result.ok and "cannot start" in result.error
