"""A tiny byte-level BPE tokenizer (ChatML, SmolLM2-like) for the tiny random checkpoints.

Trained in-process on the text below, so tests need no downloads. Its vocabulary is exactly
`VOCAB_SIZE` ids, matching the tiny models of tiny_model.py (bos id 1, eos id 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (pad/unk), 1 (bos), 2 (eos)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = """\
San Francisco is a city on the northern end of a peninsula, with the ocean to the west and a
wide bay to the east. Fog rolls in over the hills on summer evenings, and the cable cars climb
streets so steep that visitors stop to catch their breath. The city is known for its bridges,
its bookshops, its small cafés and the long conversations that happen inside them.

The capital of France is Paris. Paris sits on the Seine, a river that bends through the city
in a slow curve. People walk along the quays, buy old maps and postcards, and sit in the parks
when the weather is kind. Museums hold paintings, sculptures and strange machines; bakeries
sell bread every morning before the sun is fully up. Naïve tourists and seasoned travellers
alike find something to love there — a street, a song, a view from a window.

A language model reads a sequence of tokens and predicts the next one. It is trained on a very
large amount of text, and then it can write stories, answer questions, translate sentences, or
summarise long documents. Inference servers run these models for many users at once. They group
requests into batches, keep the attention cache in fixed-size blocks, and stream each new piece
of text back to the user as soon as it is ready. When the model is too large for one device, it
is split into stages: the first stage computes the early layers, passes its hidden states to the
next, and so on, like workers on an assembly line. Keeping every stage busy is the whole art.

Once upon a time, in a quiet village between two rivers, there lived an old clockmaker who
repaired watches for everyone in the valley. Children would come to his workshop after school to
watch the tiny gears turn, and he would tell them about the stars, the seasons and the tides.
"Time," he said, "is the only thing we spend without ever seeing it." One winter a traveller
arrived with a broken compass and a map of places nobody had heard of. The clockmaker fixed the
compass, and in return the traveller told stories of deserts, glaciers, forests and seas, of
markets where a hundred languages were spoken, and of mountains whose peaks touched the clouds.

Numbers appear everywhere: 1, 2, 3, 10, 42, 100, 2024 and 3.14159. Lists help too: apples,
oranges, bananas; red, green, blue; north, south, east, west. Questions end with a question mark?
Exclamations end with a bang! Code looks different: def main(): return {"key": [1, 2, 3]}.
Some words come from other languages: café, déjà vu, piñata, über, façade, naïve, résumé, 你好.
"""

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1024,
    "chat_template": CHAT_TEMPLATE,
}


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on CORPUS; deterministic for a given tokenizers version."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"fixture tokenizer has {tokenizer.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return tokenizer


def make_tokenizer(path: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", TOKENIZER_CONFIG)
    special_map = {key: TOKENIZER_CONFIG[key] for key in
                   ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")}
    _write_json(path / "special_tokens_map.json", special_map)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
