"""Progress of long work: a bar on a terminal, log lines otherwise, silence when quick; weight
loading counts every parameter's bytes; `asyncpp bench` says which run of how many it is on."""
from __future__ import annotations

import io
import logging
from contextlib import contextmanager

from asyncpp.bench import BenchConfig, Layout, run_benchmark
from asyncpp.engine_args import EngineArgs, create_engine_config
from asyncpp.model import loader, progress
from asyncpp.model.progress import Progress
from asyncpp.model.registry import build_model


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_name_each_step_when_not_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="asyncpp")
    with progress.progress("converting", 2, unit="steps", every_s=0) as shown:
        shown.update(0, "reading")
        shown.update(1, "writing")
        shown.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        "converting: 0/2 steps: reading", "converting: 1/2 steps: writing", "converting: done"]


def test_quick_work_says_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="asyncpp")
    with progress.progress("loading weights", 3 * 2**20, unit="B") as shown:
        for _ in range(3):
            shown.update(2**20)
    assert caplog.records == [] and capsys.readouterr().err == ""


def test_without_logging_configured_lines_go_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress.log, "hasHandlers", lambda: False)
    with progress.progress("loading weights", 2**21, unit="B", every_s=0) as shown:
        shown.update(2**20)
    assert capsys.readouterr().err.startswith("loading weights: 1 / 2 MiB (")


def test_a_bar_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    with progress.progress("loading weights", 2**20, unit="B", delay_s=0) as shown:
        shown.update(2**20)
    assert "loading weights" in terminal.getvalue() and "100%" in terminal.getvalue()


def test_loading_counts_every_parameter_byte(llama_dir, monkeypatch):
    shown: list[Progress] = []

    @contextmanager
    def recorded(desc, total, **kwargs):
        with progress.progress(desc, total, **kwargs) as tracker:
            shown.append(tracker)
            yield tracker

    config = create_engine_config(EngineArgs(model=str(llama_dir), pipeline_parallel_size=2, onednn=False))
    monkeypatch.setattr(loader, "progress", recorded)
    model = build_model(config, config.stages[1])
    (tracker,) = shown
    assert tracker.desc == "loading weights (stage 2/2)"
    assert tracker.done == tracker.total == sum(p.numel() * p.element_size() for p in model.parameters())


def test_bench_says_which_run_it_is_on(llama_dir):
    cfg = BenchConfig(model=str(llama_dir), num_requests=2, min_prompt_len=4, max_prompt_len=8, output_len=2,
                      layouts=[Layout(pp=1)], repeats=2)
    lines: list[str] = []
    run_benchmark(cfg, log=lines.append)
    assert lines[0].startswith("[bench] 2 requests on ") and lines[0].endswith("1 layout(s) x 2 timed run(s)")
    assert lines[1] == "[bench] run 1/2: asyncpp P=1, round 1/2 ..."
    assert lines[2].startswith("[bench] P=1: ") and "tok/s, 4 tokens in" in lines[2]
    assert lines[3] == "[bench] run 2/2: asyncpp P=1, round 2/2 ..."
