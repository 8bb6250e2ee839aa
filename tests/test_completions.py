"""Free-form items (TRL's text, messages and prompt-completion rows): loading, tokens scored, greedy outcome."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cpl_masks.data.completions import Completion
from cpl_masks.data.fields import FieldNames
from cpl_masks.data.questions import load_questions, write_questions
from cpl_masks.errors import CplError
from cpl_masks.models import load_model
from cpl_masks.scoring.completion import CompletionScorer, Encoded
from cpl_masks.scoring.scorers import make_scorer, score_questions
from tests.conftest import make_questions, write_rows

USER = {"role": "user", "content": "what is the capital of zorblat"}
ASSISTANT = {"role": "assistant", "content": "vexmoor city"}
ROWS = {
    "text": {"id": "t", "text": "the capital of zorblat is vexmoor"},
    "messages": {"id": "m", "messages": [USER, ASSISTANT]},
    "prompt-completion": {"id": "p", "prompt": "the capital of zorblat is", "completion": " vexmoor"},
    "conversational": {"id": "c", "prompt": [USER], "completion": [ASSISTANT]},
}


@pytest.mark.parametrize("shape", sorted(ROWS))
def test_each_trl_shape_is_read_from_its_columns_and_written_back_the_same(tmp_path, shape):
    path = write_rows(tmp_path / "data.jsonl", [ROWS[shape], {**ROWS[shape], "id": "second"}])
    items = load_questions(path)
    assert [item.form for item in items] == ["prompt-completion" if shape == "conversational" else shape] * 2
    assert items[0].conversational == (shape in ("messages", "conversational"))
    assert items[0].to_record() == ROWS[shape]
    write_questions(tmp_path / "again.jsonl", items)
    assert load_questions(tmp_path / "again.jsonl") == items


def test_field_names_and_the_format_option_read_other_columns(tmp_path):
    rows = [{"instruction": "say hi", "output": "hi", "text": "ignored"}]
    items = load_questions(
        write_rows(tmp_path / "a.jsonl", rows), fields=FieldNames(prompt="instruction", completion="output")
    )
    assert (items[0].prompt, items[0].completion) == ("say hi", "hi")
    forced = load_questions(tmp_path / "a.jsonl", data_format="text")
    assert (forced[0].form, forced[0].completion) == ("text", "ignored")


def test_a_csv_cell_holds_a_conversation_as_json(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "messages"])
        writer.writerow(["one", json.dumps([USER, ASSISTANT])])
    (item,) = load_questions(path)
    assert item.completion == (("user", USER["content"]), ("assistant", ASSISTANT["content"]))


BAD_ROWS = [
    ({"prompt": "hi", "completion": ""}, "row 1: missing or empty field 'completion'"),
    ({"prompt": "hi"}, "row 1: missing or empty field 'completion'"),
    ({"completion": "hi"}, "row 1: missing field 'prompt'"),
    ({"messages": [USER]}, "row 1: field 'messages' has no assistant message"),
    ({"messages": [USER, USER, ASSISTANT]}, "row 1: field 'messages' has two user messages in a row"),
    ({"messages": [ASSISTANT, USER, ASSISTANT]}, "row 1: field 'messages' starts with an assistant message"),
    ({"messages": [USER, {"role": "system", "content": "x"}, ASSISTANT]}, "system message after the first"),
    ({"messages": [USER, {"role": "robot", "content": "x"}]}, "message 2 has role 'robot'"),
    ({"messages": [USER, {"role": "assistant", "content": None}]}, "message 2 content must be text, not null"),
    ({"messages": [USER, {**ASSISTANT, "tool_calls": []}]}, "message 2 has field 'tool_calls'"),
    ({"messages": "nope"}, "row 1: field 'messages': invalid JSON"),
    ({"prompt": [USER], "completion": "vexmoor"}, "must both be texts or both lists of messages"),
    ({"prompt": [USER], "completion": [USER]}, "field 'completion' must start with an assistant message"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_a_bad_free_form_row_is_one_line_naming_file_and_row(tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(CplError, match=r"^" + str(path).replace("\\", "\\\\") + ": .*") as raised:
        load_questions(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_one_file_holds_one_free_form_format_beside_which_questions_may_sit(tmp_path):
    mixed = write_rows(tmp_path / "mixed.jsonl", [ROWS["prompt-completion"], ROWS["text"]])
    with pytest.raises(CplError, match="row 2 is a text row but row 1 is prompt-completion; one file holds one"):
        load_questions(mixed)
    chats = write_rows(tmp_path / "chats.jsonl", [ROWS["prompt-completion"], {**ROWS["conversational"], "id": "x"}])
    with pytest.raises(CplError, match="row 2 is a conversation but row 1 is not; one file holds one free-form"):
        load_questions(chats)
    with pytest.raises(CplError, match="--format chat: choose one of multiple-choice, text"):
        load_questions(mixed, data_format="chat")
    question = make_questions(1)[0]
    held_out = load_questions(write_rows(tmp_path / "heldout.jsonl", [ROWS["messages"], question.to_record()]))
    assert [item.form for item in held_out] == ["messages", "multiple-choice"] and held_out[1] == question


@pytest.fixture(scope="module")
def scorer(tiny) -> CompletionScorer:
    return CompletionScorer(tiny.tokenizer)


def _scored_text(scorer: CompletionScorer, item: Completion, which: str = "completion") -> str:
    encoded = scorer.encode(item)
    return scorer.tokenizer.decode([encoded.ids[position] for position in getattr(encoded, which)])


def test_prompt_completion_scores_exactly_the_completion_and_trains_on_eos_too(scorer):
    item = Completion("p", "prompt-completion", "the capital of zorblat is", " vexmoor")
    encoded = scorer.encode(item)
    prompt_length = len(scorer.tokenizer("the capital of zorblat is")["input_ids"])
    assert encoded.completion == tuple(range(prompt_length, len(encoded.ids) - 1))
    assert _scored_text(scorer, item) == " vexmoor"
    assert encoded.ids[-1] == scorer.tokenizer.eos_token_id and encoded.loss == (
        *encoded.completion,
        len(encoded.ids) - 1,
    )


def test_a_chat_template_scores_the_assistant_turns_up_to_their_end_token(scorer):
    conversation = Completion("c", "prompt-completion", (("user", "hi"),), (("assistant", "vexmoor city"),))
    assert _scored_text(scorer, conversation) == "vexmoor city<|im_end|>"
    turns = (("user", "capital"), ("assistant", "paris"), ("user", "and"), ("assistant", "rome"))
    encoded = scorer.encode(Completion("m", "messages", "", turns))
    spans = [encoded.ids[p] for p in encoded.completion]
    assert scorer.tokenizer.decode(spans) == "paris<|im_end|>rome<|im_end|>"
    assert scorer.tokenizer.decode(list(encoded.ids)).count("<|im_start|>") == 4  # the template rendered it all


def test_text_is_scored_whole_and_loss_on_all_covers_every_token(tiny, scorer):
    text = Completion("t", "text", "", "the capital of zorblat is vexmoor")
    encoded = scorer.encode(text)
    assert encoded.completion == tuple(range(1, len(encoded.ids) - 1))  # all but the first (and the EOS)
    everything = CompletionScorer(tiny.tokenizer, loss_on="all")
    item = Completion("p", "prompt-completion", "the capital of zorblat is", " vexmoor")
    assert everything.encode(item).loss == tuple(range(1, len(everything.encode(item).ids)))
    with pytest.raises(CplError, match="--loss-on prompt: choose one of completion, all"):
        CompletionScorer(tiny.tokenizer, loss_on="prompt")


@pytest.mark.parametrize("loss_on", ["completion", "all"])
def test_the_loss_is_the_models_own_cross_entropy_over_the_labelled_tokens(tiny, loss_on):
    scorer = CompletionScorer(tiny.tokenizer, loss_on=loss_on)
    items = [
        Completion("p", "prompt-completion", "the capital of zorblat is", " vexmoor"),
        Completion("c", "prompt-completion", (("user", "hi"),), (("assistant", "vexmoor city"),)),
    ]
    losses = scorer.loss(tiny.model, items)  # one batch, left-padded
    for item, loss in zip(items, losses):
        encoded = scorer.encode(item)
        labels = torch.full((1, len(encoded.ids)), -100)
        labels[0, list(encoded.loss)] = torch.tensor([encoded.ids[p] for p in encoded.loss])
        expected = tiny.model(input_ids=torch.tensor([encoded.ids]), labels=labels).loss  # HF shifts the labels
        assert torch.allclose(loss, expected, atol=1e-5)


def test_the_greedy_outcome_is_what_generate_decodes(tiny, scorer, monkeypatch):
    prompts = ["the capital of france is", "what is the largest planet", "king queen river born year"]
    encoded, expected = {}, {}
    for index, prompt in enumerate(prompts):
        ids = scorer.tokenizer(prompt)["input_ids"]
        greedy = tiny.model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids) :].tolist()
        other = (greedy[-1] + 1) % len(scorer.tokenizer)
        for name, completion in (("same", greedy), ("last-changed", [*greedy[:-1], other])):
            key = f"{name}-{index}"
            whole = tuple(ids + completion)
            encoded[key] = Encoded(whole, tuple(range(len(ids), len(whole))), tuple(range(len(ids), len(whole))))
            expected[key] = (name == "same", 4 if name == "same" else 3)
    monkeypatch.setattr(scorer, "encode", lambda item: encoded[item.id])
    items = [Completion(key, "prompt-completion", "", "x") for key in encoded]
    outcomes = scorer.outcomes(tiny.model, items)  # one padded batch of different lengths
    for key, (reproduced, correct, _, logprob, margin) in zip(encoded, outcomes):
        assert (correct, reproduced) == expected[key]
        assert (margin > 0) == correct and logprob < 0


def test_mixed_sets_score_each_item_by_its_format_in_input_order(tiny):
    scorer = make_scorer("letter", tiny.tokenizer)
    questions = make_questions(3)
    items = [Completion("p", "prompt-completion", "the capital of", " paris"), Completion("t", "text", "", "red sun")]
    mixed = [questions[0], items[0], questions[1], items[1], questions[2]]
    together = score_questions(tiny.model, scorer, mixed, batch_size=5, show_progress=False)
    alone = score_questions(tiny.model, scorer, questions, show_progress=False)
    free = score_questions(tiny.model, scorer, items, show_progress=False)
    assert together.predictions == [
        alone.predictions[0],
        free.predictions[0],
        alone.predictions[1],
        free.predictions[1],
        alone.predictions[2],
    ]
    assert together.losses == pytest.approx(
        [alone.losses[0], free.losses[0], alone.losses[1], free.losses[1], alone.losses[2]], abs=1e-5
    )
    losses = scorer.loss(tiny.model, mixed)
    assert losses.tolist() == pytest.approx(together.losses, abs=1e-4)
    with pytest.raises(CplError, match="a free-form item has no choices; use --objective answer"):
        scorer.objective("choices")(tiny.model, mixed)


def test_a_conversation_needs_a_chat_template_and_a_prompt_must_fit_the_context(tiny_base_model_dir, tiny):
    base = load_model(str(tiny_base_model_dir), device="cpu")
    item = Completion("c", "messages", "", (("user", "hi"), ("assistant", "yo")), source="chat.jsonl", row=3)
    with pytest.raises(CplError, match=r"^chat.jsonl: row 3: a conversational row needs a chat template"):
        make_scorer("letter", base.tokenizer).check_fits(base.model, [item])
    long = Completion("l", "prompt-completion", "the " * 600, " red", source="long.jsonl", row=2)
    with pytest.raises(
        CplError,
        match=r"^long.jsonl: row 2: prompt and completion are \d+ tokens, longer than the model's context \(512\)",
    ):
        make_scorer("letter", tiny.tokenizer).check_fits(tiny.model, [long])


@pytest.mark.parametrize("method", ["full", "mask", "dynamic", "random-signs", "lora", "replay", "agem", "ewc"])
def test_every_method_trains_on_free_form_items_beside_multiple_choice_ones(tiny_model_dir, method):
    from cpl_masks.methods import MethodContext, make_method
    from cpl_masks.training.loop import TrainConfig, TrainingLoop
    from tests.test_train import random_mask

    loaded = load_model(str(tiny_model_dir), device="cpu", threads=1)
    scorer = make_scorer("letter", loaded.tokenizer)
    inject = [Completion(f"i{i}", "prompt-completion", (("user", f"name {i}"),), (("assistant", "vexmoor"),))
              for i in range(4)]  # fmt: skip
    mastered = [*make_questions(2, seed=7), Completion("t", "text", "", "the sun is red")]  # a mixed M
    mask = random_mask(loaded.model) if method == "mask" else None
    context = MethodContext(scorer=scorer, mastered=mastered, mask=mask, inject=inject, batch_size=2, seed=0)
    config = TrainConfig(lr=0.01, batch_size=2, optimizer="adamw", show_progress=False)
    trainer = TrainingLoop(loaded.model, scorer, make_method(method, context, None), config)
    before = scorer.loss(trainer.model, inject).mean()
    for epoch in (1, 2):
        trainer.train_epoch(inject, epoch)
    assert scorer.loss(trainer.model, inject).mean() < before  # the completions' loss fell
