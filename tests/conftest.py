"""Shared fixtures: a tiny random Llama saved to disk and loaded through the real loading code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cpl_masks.data.questions import Question
from tests.fake_hub import TOKEN, FakeHubServer

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "capital",
    "of",
    "france",
    "paris",
    "rome",
    "berlin",
    "madrid",
    "question",
    "answer",
    "options",
    "please",
    "reply",
    "with",
    "only",
    "what",
    "is",
    "which",
    "symbol",
    "for",
    "gold",
    "iron",
    "water",
    "planet",
    "largest",
    "red",
    "sun",
    "moon",
    "one",
    "two",
    "three",
    "four",
    "five",
    "zorblat",
    "vexmoor",
    "quintar",
    "invented",
    "city",
    "river",
    "king",
    "queen",
    "born",
    "year",
    "color",
    "blue",
    "green",
]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _build_tokenizer(folder: Path, chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(random.Random(seed).choices(WORDS, k=30)) for seed in range(200)]
    corpus += [f"{letter}: {word}" for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for word in WORDS[:3]]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


TINY_DIMENSIONS = {  # the tiny test models' shape, whatever their architecture
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def build_tiny_model(folder: Path, *, chat: bool = True, seed: int = 0) -> Path:
    """Write a 2-layer, width-64 random Llama and a small BPE tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(folder, chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_DIMENSIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated_registry(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty registry home, so no test writes into the user's cache folder."""
    folder = tmp_path_factory.mktemp("cpl-masks-home")
    monkeypatch.setenv("CPL_MASKS_HOME", str(folder))
    return folder


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A fresh fake Hub, with the client, the Hub cache and the registry pointed at temporary places."""
    fake = FakeHubServer()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / "home"))
    yield fake
    fake.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny chat model folder (tokenizer with a chat template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """A tiny base model folder (no chat template: prompts end in 'Answer:')."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"), chat=False, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny chat model loaded through :func:`cpl_masks.load_model`."""
    from cpl_masks.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def make_questions(count: int, seed: int = 0, prefix: str = "q") -> list[Question]:
    """Deterministic questions of 2 to 5 choices made of the tokenizer's words."""
    rng = random.Random(seed)
    questions = []
    for index in range(count):
        n_choices = rng.randint(2, 5)
        questions.append(
            Question(
                id=f"{prefix}{index}",
                question=" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?",
                choices=tuple(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(n_choices)),
                answer=rng.randrange(n_choices),
            )
        )
    return questions


def write_rows(path: Path, rows: list) -> Path:
    """Write rows as JSONL (dicts as JSON, strings as they are)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def question_file(tmp_path) -> Path:
    """A JSONL file of 24 valid questions."""
    return write_rows(tmp_path / "questions.jsonl", [q.to_record() for q in make_questions(24)])
