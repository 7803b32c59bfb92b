"""Incremental detokenization: deltas add up to tokenizer.decode, never split a character."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from asyncpp.engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from asyncpp.model import default_model
from asyncpp.testing.tiny_tokenizer import CORPUS, make_tokenizer

TEXTS = [
    "The capital of France is Paris — café, naïve, déjà vu, 你好 🎉!\n  Two  spaces\tand a tab.",
    '  Leading spaces; code: def f(x): return {"k": [1, 2]} 🙂🙃 über façade résumé 3.14159',
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer")))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer: from the converted default model if present, else from its GGUF."""
    converted = default_model.cache_dir() / "models" / default_model.DEFAULT_MODEL_NAME
    if default_model.is_converted(converted):
        return AutoTokenizer.from_pretrained(converted)
    try:
        gguf = default_model.bundled_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(params=["tiny", "smol"])
def byte_level_tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def sentencepiece_style_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A small BPE with byte fallback and "▁" for spaces, decoded as Llama 2 or as Metaspace does."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=50, show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    if style == "llama2":
        spec["pre_tokenizer"] = None
        spec["normalizer"] = json.loads(normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]).__getstate__())
        decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    spec["decoder"] = json.loads(decoder.__getstate__())
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def detokenize(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(token) for token in output]
    assert "".join(deltas) == detok.text
    return deltas, detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_typical_text_matches_decode(byte_level_tokenizer, skip):
    tok = byte_level_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say something."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    for text in TEXTS:
        output = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        deltas, joined = detokenize(tok, prompt, output, skip)
        assert joined == tok.decode(output, skip_special_tokens=skip)
        assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_random_tokens_match_decode(byte_level_tokenizer, skip):
    tok, rng = byte_level_tokenizer, random.Random(0)
    for _ in range(200):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
        output = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        _, text = detokenize(tok, prompt, output, skip)
        expected = tok.decode(output, skip_special_tokens=skip)
        if expected.endswith("\ufffd"):  # the last character is incomplete: it is held back
            assert expected.startswith(text) and not text.endswith("\ufffd")
        else:
            assert text == expected


def test_multibyte_character_is_held_until_complete(smol_tokenizer):
    tok = smol_tokenizer
    output = tok.encode(" 🎉", add_special_tokens=False)
    assert len(output) >= 2  # the emoji's four bytes span several byte-level tokens
    deltas, text = detokenize(tok, tok.encode("Party"), output)
    assert deltas[:-1] == [""] * (len(output) - 1) and deltas[-1] == " 🎉" == text


def test_special_tokens_skipped_or_kept(tiny_tokenizer):
    tok = tiny_tokenizer
    hello, world = (tok.encode(text, add_special_tokens=False) for text in ("Hello", " world"))
    output = hello + [tok.eos_token_id] + world
    assert detokenize(tok, [1], output, skip_special_tokens=True)[1] == "Hello world"
    assert detokenize(tok, [1], output, skip_special_tokens=False)[1] == "Hello<|im_end|> world"


def test_prompt_ending_mid_character_does_not_leak_into_output(smol_tokenizer):
    tok = smol_tokenizer
    ids = tok.encode("Fireworks 🎉 tonight", add_special_tokens=False)
    emoji_start = next(i for i in range(len(ids)) if "\ufffd" in tok.decode(ids[: i + 1]))
    prompt, output = ids[: emoji_start + 1], ids[emoji_start + 1:]
    _, text = detokenize(tok, prompt, output)
    assert text == tok.decode(output) and "Fireworks" not in text


@pytest.mark.parametrize("style", ["llama2", "metaspace"])
def test_sentencepiece_style_keeps_leading_space_in_context(style):
    tok = sentencepiece_style_tokenizer(style)
    prompt_text = "The capital of France is"
    prompt = tok.encode(prompt_text, add_special_tokens=False)
    for completion in [" Paris.", " Paris, café 你好 and 🎉 too."]:
        ids = tok.encode(prompt_text + completion, add_special_tokens=False)
        assert ids[: len(prompt)] == prompt
        deltas, text = detokenize(tok, prompt, ids[len(prompt):])
        assert text == completion == tok.decode(ids)[len(tok.decode(prompt)):]
        assert all("\ufffd" not in delta for delta in deltas)


def test_empty_prompt(tiny_tokenizer):
    output = tiny_tokenizer.encode("Once upon a time", add_special_tokens=False)
    assert detokenize(tiny_tokenizer, [], output)[1] == "Once upon a time"


def test_needs_a_fast_tokenizer():
    with pytest.raises(TypeError, match="tokenizer.json"):
        backend_tokenizer(object())
