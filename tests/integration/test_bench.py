"""Keeps the throughput benchmark from rotting: a tiny run end to end, plus its pure parts."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncpp.bench import (
    BenchConfig,
    Layout,
    RequestTrace,
    SystemResult,
    add_arguments,
    bench_config_from_args,
    check_parity,
    default_workload_dir,
    format_report,
    format_table,
    make_workload_model,
    median_run,
    parse_layout,
    parse_layouts,
    run_benchmark,
)
from asyncpp.bench.workload import WORKLOADS, publish_folder
from benchmarks.peer_hf import HFPeer
from benchmarks.throughput import add_peer_arguments, build_peers, run

ROOT = Path(__file__).resolve().parents[2]
HARNESS_MODULES = ("matplotlib", "vllm", "benchmarks", "benchmarks.throughput", "benchmarks.peer_hf",
                   "benchmarks.peer_vllm", "benchmarks.peer_vllm_child", "benchmarks.throughput_plot")


def test_tiny_benchmark_with_hf_runs_end_to_end(llama_dir):
    cfg = BenchConfig(model=str(llama_dir), num_requests=2, min_prompt_len=4, max_prompt_len=12,
                      output_len=4, layouts=[Layout(pp=1)])
    report = run(cfg, [HFPeer(requests=2, threads=1)], log=lambda *_: None)
    p1, hf = report.results
    assert p1.ok, p1.error
    assert (p1.name, p1.kind) == ("P=1", "asyncpp")
    assert p1.output_tokens == hf.output_tokens == 8
    assert [len(ids) for ids in p1.token_ids] == [4, 4]
    assert p1.ttft_p50_ms is not None and p1.itl_p50_ms is not None
    assert p1.speedup_vs_hf is not None and p1.ratio_vs_p1 == pytest.approx(1.0)
    assert report.parity == []  # asyncpp and HF agree token by token (greedy, fp32)
    assert report.config["hf_requests"] == 2
    text = format_report(report)
    assert "P=1" in text and "HF generate" in text and "vs HF" in text and "parity: identical" in text
    json.dumps(report.to_json())


def test_repeated_runs_report_the_median_run(llama_dir):
    cfg = BenchConfig(model=str(llama_dir), num_requests=2, min_prompt_len=4, max_prompt_len=12,
                      output_len=4, layouts=[Layout(pp=1)], repeats=3)
    lines: list[str] = []
    report = run_benchmark(cfg, log=lines.append)
    (p1,) = report.results
    assert len(p1.runs_tok_s) == 3 and sorted(p1.runs_tok_s)[1] == pytest.approx(p1.tokens_per_s)
    assert sum("round" in line for line in lines) == 3
    text = format_report(report)
    assert "runs: P=1:" in text and "vs HF" not in text  # asyncpp bench alone: no peer column


def test_median_run_skips_failures_and_keeps_a_real_run():
    runs = [SystemResult("P=1", "asyncpp", output_tokens=100, total_s=t) for t in (1.0, 4.0, 2.0)]
    runs.append(SystemResult("P=1", "asyncpp", error="boom"))
    chosen = median_run(runs)
    assert chosen is runs[2] and chosen.runs_tok_s == [100.0, 25.0, 50.0]
    assert not median_run([SystemResult("P=1", "asyncpp", error="boom")]).ok


@pytest.mark.parametrize("text, expected", [
    ("p1", Layout(1, 1, None)), ("p2v2", Layout(2, 1, 2)), ("P=2,V=1", Layout(2, 1, 1)),
    ("t2", Layout(1, 2, None)), ("p2t2", Layout(2, 2, None)), ("v1p3", Layout(3, 1, 1)),
    ("p2v2@5,3", Layout(2, 1, 2, "5,3")), ("p2@auto", Layout(2, 1, None, "auto")),
    ("p2@cost", Layout(2, 1, None, "cost")),
])
def test_parse_layout(text, expected):
    assert parse_layout(text) == expected


@pytest.mark.parametrize("text", ["", "x2", "p", "p2p2", "p0", "p2x", "p2@", "p2@5;3", "p2@a,b"])
def test_parse_layout_rejects(text):
    with pytest.raises(ValueError, match="layout"):
        parse_layout(text)


def test_layout_names():
    names = [layout.name for layout in parse_layouts("p1 p2v2 p2v1 t2 p2t2")]
    assert names == ["P=1", "P=2,V=2", "P=2,V=1", "P=1,T=2", "P=2,T=2"]
    assert parse_layout("p2v2@5,3").name == "P=2,V=2 [5,3]"
    assert parse_layout("p2v2@5,3").engine_kwargs()["pp_layer_partition"] == "5,3"


def test_layout_precision_options():
    layout = parse_layout("p2v2/bf16/kv8/int8")
    assert layout.name == "P=2,V=2 bf16 kv=fp8 w=int8"
    assert layout.engine_kwargs() == {"pipeline_parallel_size": 2, "tensor_parallel_size": 1,
                                           "num_virtual_engines": 2, "dtype": "bfloat16",
                                           "kv_cache_dtype": "fp8", "quantization": "int8"}
    assert parse_layout("p1/fp32").precision.label == "fp32"
    for bad in ("p1/bf16/fp32", "p1/int4"):
        with pytest.raises(ValueError, match="layout option"):
            parse_layout(bad)


def test_parity_is_exact_in_fp32_only():
    fp32 = _result("P=1 fp32", "asyncpp", [[1, 2, 3]])
    bf16 = _result("P=1 bf16", "asyncpp", [[1, 7, 3]])
    bf16_p2 = _result("P=2 bf16", "asyncpp", [[1, 7, 8]])
    vllm_bf16 = _result("vLLM P=1 bf16", "vllm", [[9, 9, 9]])
    vllm_fp32 = _result("vLLM P=1 fp32", "vllm", [[1, 2, 4]])
    for r, label in [(fp32, "fp32"), (bf16, "bf16"), (bf16_p2, "bf16"), (vllm_bf16, "bf16"), (vllm_fp32, "fp32")]:
        r.precision = label
    assert check_parity([fp32, bf16, bf16_p2, vllm_bf16, vllm_fp32], 3) == [
        "vLLM P=1 fp32 vs P=1 fp32: request 0 differs from token 2"]


def test_inter_token_latency_splits_a_multi_token_arrival():
    trace = RequestTrace(start=10.0)
    for now, total in [(10.5, 1), (10.6, 2), (10.6, 2), (10.9, 5)]:
        trace.record(now, total)
    assert trace.ttft == pytest.approx(0.5)
    assert trace.inter_token_latencies() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert trace.end == 10.9


def _result(name, kind, ids):
    return SystemResult(name=name, kind=kind, requests=len(ids), output_tokens=sum(map(len, ids)),
                        total_s=1.0, token_ids=ids)


def test_parity_reports_the_first_differing_token():
    same = _result("P=1", "asyncpp", [[1, 2, 3], [4, 5, 6]])
    other = _result("P=2,V=2", "asyncpp", [[1, 2, 3], [4, 9, 6]])
    skipped = SystemResult(name="P=1,T=2", kind="asyncpp", error="ValueError: no TP")
    assert check_parity([same, other, skipped], 3) == ["P=2,V=2 vs P=1: request 1 differs from token 1"]
    assert check_parity([same, _result("HF generate", "hf", [[1, 2, 3]])], 3) == []
    assert "skipped" in format_table([same, skipped])


def test_the_table_shows_each_split_and_how_it_was_chosen():
    auto = SystemResult("P=2,V=2", "asyncpp", layer_partition=[4.5, 3.5], layer_partition_source="auto")
    given = SystemResult("P=2,V=2 [5,3]", "asyncpp", layer_partition=[5, 3], layer_partition_source="given")
    one = SystemResult("P=1", "asyncpp", layer_partition=[8])
    assert [r.layers for r in (auto, given, one)] == ["4.5,3.5 auto", "5,3 given", "8"]
    assert "4.5,3.5 auto" in format_table([one, auto, given])


def test_cli_flags_become_engine_kwargs():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = bench_config_from_args(parser.parse_args(
        ["/some/model", "--layouts", "p2v1 t2", "--max-num-seqs", "8", "--output-len", "16"]))
    assert cfg.model == "/some/model" and cfg.output_len == 16
    assert cfg.layouts == [Layout(2, 1, 1), Layout(1, 2, None)]
    assert cfg.engine_kwargs == {"max_num_seqs": 8}
    with pytest.raises(SystemExit):
        parser.parse_args(["--hf-requests", "4"])  # a peer's flag: benchmarks/throughput.py only


def test_moe_workload_flag_and_its_model(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert bench_config_from_args(parser.parse_args([])).workload == "w"
    assert bench_config_from_args(parser.parse_args(["--workload", "moe"])).workload == "moe"
    with pytest.raises(SystemExit, match="not both"):
        bench_config_from_args(parser.parse_args(["/some/model", "--workload", "moe"]))
    built: list[Path] = []
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("asyncpp.bench.workload._save_moe_workload_model", lambda out: built.append(out) or
                        [(out / name).write_text("{}") for name in ("config.json", "model.safetensors")])
    assert WORKLOADS["moe"]() == tmp_path / "bench" / "w-qwen3-moe" and len(built) == 1


def test_throughput_flags_choose_the_peers():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    add_peer_arguments(parser)
    peers = build_peers(parser.parse_args(["--hf-requests", "4", "--hf-threads", "1", "--vllm-python", "py"]))
    assert [type(p).__name__ for p in peers] == ["VLLMPeer", "HFPeer"]
    assert peers[1] == HFPeer(4, 1) and peers[1].count(2) == 2
    assert build_peers(parser.parse_args(["--hf-requests", "0"])) == []


def test_workload_model_lives_in_the_asyncpp_cache_dir(tmp_path, monkeypatch):
    def save_tiny(out: Path) -> None:  # stands in for the 230 MB random Llama
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("")

    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("asyncpp.bench.workload._save_workload_model", save_tiny)
    assert default_workload_dir() == tmp_path / "bench" / "w-llama"
    assert make_workload_model() == tmp_path / "bench" / "w-llama"
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == ["w-llama"]  # no staging folder left


def _complete(path: Path) -> bool:
    return (path / "done").exists()


def test_publish_folder_never_shows_a_half_written_folder(tmp_path):
    target = tmp_path / "model"

    def write(out: Path) -> None:
        assert not target.exists() and out.parent == tmp_path  # staged beside the target, not in it
        (out / "done").write_text("mine")

    assert publish_folder(target, write, _complete) == target
    assert (target / "done").read_text() == "mine"
    publish_folder(target, lambda out: pytest.fail("a complete folder is reused"), _complete)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_folder_race_keeps_the_first_and_replaces_a_damaged_one(tmp_path):
    target = tmp_path / "model"

    def write_while_another_finishes(out: Path) -> None:
        (out / "done").write_text("mine")
        target.mkdir()
        (target / "done").write_text("theirs")

    publish_folder(target, write_while_another_finishes, _complete)
    assert (target / "done").read_text() == "theirs"
    (target / "done").unlink()  # damaged: exists but incomplete
    (target / "partial").write_text("")
    publish_folder(target, lambda out: (out / "done").write_text("rebuilt"), _complete)
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_runtime_never_imports_the_comparison_harness():
    """Every module of asyncpp and the server, and the CLI's parser: no HF/vLLM peer, no plot."""
    code = textwrap.dedent('''
        import importlib, pkgutil, sys
        import asyncpp, asyncpp.bench, asyncpp.cli, server
        for package in (asyncpp, server):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if not info.name.endswith(".__main__"):
                    importlib.import_module(info.name)
        asyncpp.cli.build_parser()
        print(" ".join(sorted(sys.modules)))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert "asyncpp.bench.runner" in loaded
    assert loaded.isdisjoint(HARNESS_MODULES), sorted(loaded.intersection(HARNESS_MODULES))
