"""A chat-template renderer process: run as a script by `template_sandbox.py`, it imports only
the standard library and jinja2, caps its own address space, and renders one request after
another from its stdin to its stdout.

Frames both ways: a 4-byte big-endian length, then that many bytes of UTF-8 JSON. It first
sends an empty frame (ready). A request: {"template", "messages", "add_generation_prompt",
"variables", "max_chars"}. A reply: {"text": ...} or {"error": kind, "message": ...}.

The environment is transformers' (`transformers.utils.chat_template_utils`, 5.x): an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
extension and a `{% generation %}` block that renders its body, the `tojson` filter, and the
`raise_exception`, `strftime_now`, `dict` and `namespace` globals; messages lose their None
values and get the reasoning aliases, as `apply_chat_template` does. Importing transformers
here would cost seconds and tens of MB per process."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import signal
import struct
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

HEADER = struct.Struct(">I")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
PR_SET_PDEATHSIG = 1


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it
    (for masks we do not build); rendering it is rendering its body."""
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def raise_exception(message: str) -> None:
    raise TemplateError(message)


def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class TemplateDict:
    """`dict(...)` without the class's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a namespace, "
                                f"but got {name!r}.")


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


ENV = environment()


@lru_cache(maxsize=16)
def compiled(template: str) -> jinja2.Template:
    return ENV.from_string(template)


def chat_messages(messages: list[Any]) -> list[Any]:
    """As `apply_chat_template` passes them: no None values, reasoning under its aliases."""
    out = []
    for message in messages:
        if isinstance(message, dict):
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(request: dict[str, Any]) -> dict[str, Any]:
    variables = {"tools": None, "documents": None, **request["variables"]}  # as apply_chat_template's defaults
    text = compiled(request["template"]).render(
        messages=chat_messages(request["messages"]), add_generation_prompt=request["add_generation_prompt"],
        **variables)
    if len(text) > request["max_chars"]:
        return {"error": "too_long", "message": str(len(text))}
    return {"text": text}


def answer(request: dict[str, Any]) -> dict[str, Any]:
    try:
        return render(request)
    except MemoryError:
        return {"error": "memory", "message": "the chat template needs more memory than a renderer may use"}
    except RecursionError:
        return {"error": "recursion", "message": "the chat template recurses too deeply"}
    except (TemplateSyntaxError, SecurityError, OverflowError) as e:  # OverflowError: the sandbox's range limit
        return {"error": "template", "message": f"{type(e).__name__}: {e}"}
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        return {"error": "input", "message": str(e)}
    except Exception as e:  # the template's code is someone else's: any failure is theirs to read
        return {"error": "template", "message": f"{type(e).__name__}: {e}"}


def read_frame(stream: Any) -> bytes | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None  # the engine closed the pipe: it is done with us
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def write_frame(stream: Any, payload: bytes) -> None:
    stream.write(HEADER.pack(len(payload)) + payload)
    stream.flush()


def die_with_parent(parent: int) -> None:
    """SIGKILL when the engine's process goes (Linux): a render in progress ends with it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it went before the call
        os._exit(0)


def main() -> None:
    memory_bytes, parent = int(sys.argv[1]), int(sys.argv[2])
    die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    write_frame(stdout, b"")
    while (frame := read_frame(stdin)) is not None:
        try:
            reply = answer(json.loads(frame))
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": "input", "message": f"bad request to the renderer: {e}"}
        if "error" in reply:
            gc.collect()  # a failed render's frames hold its data in a cycle with the traceback
        write_frame(stdout, json.dumps(reply).encode())  # ASCII: lone surrogates survive


if __name__ == "__main__":
    main()
