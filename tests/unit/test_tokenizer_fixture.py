"""The tiny test tokenizer loads with AutoTokenizer, fits the tiny models and round-trips text."""
from __future__ import annotations

import shutil

import pytest
from transformers import AutoConfig, AutoTokenizer

from asyncpp.testing.tiny_tokenizer import VOCAB_SIZE, build_tokenizer, make_tokenizer

TEXTS = ["San Francisco is a", "The capital of France is Paris.",
         "  spaces,\ttabs\nand lines; café naïve 你好 🎉 {\"k\": [1, 2]}", ""]


@pytest.fixture(scope="module")
def model_with_tokenizer(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    shutil.copy(llama_dir / "config.json", folder / "config.json")
    return make_tokenizer(folder)


def test_files_written(model_with_tokenizer):
    names = {p.name for p in model_with_tokenizer.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"} <= names


def test_fits_the_tiny_models(model_with_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_with_tokenizer)
    config = AutoConfig.from_pretrained(model_with_tokenizer)
    assert len(tokenizer) == VOCAB_SIZE == config.vocab_size
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert special_ids == (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 0)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trips_text(model_with_tokenizer, text):
    tokenizer = AutoTokenizer.from_pretrained(model_with_tokenizer)
    ids = tokenizer.encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text


def test_chat_template(model_with_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_with_tokenizer)
    messages = [{"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2 and tokenizer.decode(ids) == text


def test_deterministic():
    assert build_tokenizer().to_str() == build_tokenizer().to_str()
