"""Which engine a test gets: the keywords of its `asyncpp` markers (the closest wins) over the
`--asyncpp-*` command-line options over the `asyncpp_*` ini settings over the defaults below.

Tests whose settings come out equal share one engine (and one server) for the session."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from asyncpp.engine_args import EngineArgs

BUNDLED = "bundled"  # the bundled SmolLM2 (converted once into the asyncpp cache)
TINY = "tiny"  # a tiny random Llama with a tiny tokenizer, built once per session


@dataclass(frozen=True, slots=True)
class Option:
    """One setting, as ini `asyncpp_<name>` and command-line `--asyncpp-<name>`."""
    name: str
    kind: type
    default: str
    help: str

    @property
    def ini(self) -> str:
        return f"asyncpp_{self.name}"

    @property
    def flag(self) -> str:
        return "--asyncpp-" + self.name.replace("_", "-")


OPTIONS = (
    Option("model", str, BUNDLED, f"{BUNDLED} (SmolLM2-135M-Instruct), {TINY} (a random 4-layer Llama "
                                  "built per session) or a Hugging Face model folder"),
    Option("pipeline_parallel_size", int, "1", "pipeline stages (P)"),
    Option("tensor_parallel_size", int, "1", "tensor-parallel ranks per stage (T)"),
    Option("dtype", str, "auto", "float32 | float16 | bfloat16 | auto"),
    Option("device", str, "auto", "cpu | cuda | auto; tests that would need CUDA without it are skipped"),
    Option("max_model_len", int, "1024", "longest prompt + output"),
    Option("kv_cache_memory", str, "256MiB", "KV-cache memory on CPU"),
)
ENGINE_KEYWORDS = frozenset(f.name for f in fields(EngineArgs))


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Resolved settings: `model` as written (bundled, tiny or a folder), the rest EngineArgs keywords."""
    model: str
    engine_kwargs: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        """Equal for settings that may share an engine (values need not be hashable)."""
        return repr((self.model, self.engine_kwargs))

    @property
    def device(self) -> str:
        return dict(self.engine_kwargs).get("device", "auto")

    def engine_args(self, tiny_model: str | None = None) -> EngineArgs:
        """`tiny_model`: the folder of the tiny model, when `model` is tiny."""
        model = {BUNDLED: None, TINY: tiny_model}.get(self.model, self.model)
        return EngineArgs(model=model, **dict(self.engine_kwargs))


def resolve(configured: Mapping[str, str | None], markers: Iterable[Mapping[str, Any]]) -> EngineSettings:
    """`configured`: each option's command-line value, else its ini value (None: unset);
    `markers`: the `asyncpp` markers' keywords, closest first."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        text = configured.get(option.name)
        values[option.name] = option.kind(text if text not in (None, "") else option.default)
    for keywords in reversed(list(markers)):
        unknown = set(keywords) - ENGINE_KEYWORDS
        if unknown:
            raise ValueError(f"@pytest.mark.asyncpp: unknown keyword(s) {sorted(unknown)}; "
                             "it takes EngineArgs keywords (model, pipeline_parallel_size, dtype, device, ...)")
        values.update(keywords)
    model = str(values.pop("model") or BUNDLED)
    return EngineSettings(model, tuple(sorted(values.items())))
