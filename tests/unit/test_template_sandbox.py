"""A request's chat template renders in a renderer process: as transformers renders it, and
bounded: a loop past the deadline is killed (and replaced), a memory bomb hits the renderer's
cap (measured on the renderer) and not the engine, recursion and the sandbox's own refusals
are the template's fault (InvalidRequest naming `chat_template`), a cancelled render kills
its renderer, and nothing outlives `aclose`."""
from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from transformers import AutoTokenizer

from asyncpp.chat_template import render_request_template
from asyncpp.core.errors import EngineDeadError, InvalidRequest, QueueFullError
from asyncpp.template_sandbox import TemplateSandbox
from asyncpp.testing.tiny_tokenizer import make_tokenizer
from helpers.processes import alive

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": None},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
            {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
# What transformers gives templates: namespace, tojson, loop controls, the generation block,
# raise_exception, dict, special tokens as variables, reasoning aliases, None values dropped.
RICH = ("{% set ns = namespace(n=0) %}{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% if m.role == 'assistant' %}{% generation %}[{{ m.thinking }}]"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content | tojson }}{{ m.name is defined }}{% endif %}"
        "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{{ extra }}{% if add_generation_prompt %}>{% endif %}")
SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
DOUBLING = "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
RECURSIVE = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
CAP = 256 * 2**20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def memory(pid: int | str, field: str) -> int:
    """VmHWM (the peak resident size) or VmRSS (now), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) * 1024


def rss() -> int:
    return memory("self", "VmRSS")


async def test_renders_as_transformers(tokenizer):
    sandbox = TemplateSandbox(max_chars=10_000)
    try:
        for template, messages in ((tokenizer.chat_template, MESSAGES[:3]), (RICH, MESSAGES)):
            for prompt in (True, False):
                ours = await render_request_template(sandbox, tokenizer, template, messages, prompt,
                                                     {"extra": "!", "chat_template": template}, 30)
                theirs = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=prompt, extra="!")
                assert ours == theirs
        with pytest.raises(InvalidRequest, match="cannot apply the chat template: no system") as info:
            await sandbox.render("{{ raise_exception('no system') }}", MESSAGES, True, {}, 30)
        assert info.value.param == "messages"
        with pytest.raises(InvalidRequest, match="rendered chat is 10001 characters") as info:
            await sandbox.render("{{ 'x' * 10001 }}", MESSAGES, True, {}, 30)
        assert info.value.param == "messages" and len(sandbox.pids()) == 1  # one renderer did it all
    finally:
        await sandbox.aclose()


@pytest.mark.parametrize("template,why", [
    (SLOW, "took longer than 1 s"), (DOUBLING, "more memory than a renderer may use"),
    ("{{ 'x' * 1000000000 }}{{ 'y' * 1000000000 }}", "more memory"), (RECURSIVE, "recurses too deeply"),
    ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"), ("{% for %}", "TemplateSyntaxError"),
], ids=["slow", "doubling", "huge-repeat", "recursive", "huge-range", "escape", "syntax"])
async def test_hostile_templates_are_the_templates_fault_and_bounded(template, why):
    sandbox = TemplateSandbox(max_chars=10_000, memory_bytes=CAP)
    before = rss()
    try:
        await sandbox.render("{{ messages[0].content }}", MESSAGES, True, {}, 30)  # warm
        [first] = sandbox.pids()
        with pytest.raises(InvalidRequest, match=why) as info:
            await sandbox.render(template, MESSAGES, True, {}, 1)
        assert info.value.param == "chat_template"
        if template == SLOW:  # killed at the deadline
            assert sandbox.pids() == [] and not alive(first)
        else:  # it answered; its peak stayed under its cap, and it let go of what it took
            assert sandbox.pids() == [first] and memory(first, "VmHWM") < CAP
            assert memory(first, "VmRSS") < 64 * 2**20
        assert rss() - before < 64 * 2**20  # the engine's own memory never saw the bomb
        assert await sandbox.render("{{ messages[0].content }}", MESSAGES, True, {}, 30) == "Be brief."
    finally:
        await sandbox.aclose()
    assert not any(alive(p) for p in [first, *sandbox.pids()])


async def test_pool_waits_within_the_deadline_and_cancelling_kills_the_render():
    sandbox = TemplateSandbox(max_chars=10_000, size=2)
    outcomes: list[str] = []

    async def slow() -> None:
        try:
            await sandbox.render(SLOW, MESSAGES, True, {}, 2)
        except InvalidRequest as e:
            outcomes.append(e.param or "")
        except QueueFullError:
            outcomes.append("busy")

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(slow)
            while len(sandbox.pids()) < 2:
                await anyio.sleep(0.01)
            outcomes.append("loop free")  # the renders block nothing here
        assert outcomes[0] == "loop free" and sorted(outcomes[1:]) == ["busy", "chat_template", "chat_template"]
        with anyio.move_on_after(1):
            await sandbox.render(SLOW, MESSAGES, True, {}, 30)
        assert sandbox.pids() == []  # the cancelled render's renderer was killed, not left spinning
    finally:
        await sandbox.aclose()


async def test_aclose_kills_renderers_mid_render():
    sandbox = TemplateSandbox(max_chars=10_000)
    errors: list[Exception] = []

    async def render() -> None:
        try:
            await sandbox.render(SLOW, MESSAGES, True, {}, 30)
        except EngineDeadError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(render)
        while not sandbox.pids():
            await anyio.sleep(0.01)
        pids = sandbox.pids()
        await sandbox.aclose()
    assert not any(alive(p) for p in pids) and "shut down" in str(errors[0])
    with pytest.raises(EngineDeadError):
        await sandbox.render("x", MESSAGES, True, {}, 30)
