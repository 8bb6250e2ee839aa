"""Retain sets: sign(g_M) profiled once, stored and shared like a mask, steering the per-step rule anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.hub import markdown_text
from cpl_masks.integrations.sign_rule import apply_retain
from cpl_masks.integrations.trainer import apply_mask
from cpl_masks.masks.algebra import combine
from cpl_masks.masks.format import Mask
from cpl_masks.masks.reading import read_header
from cpl_masks.methods import MethodContext, make_method
from cpl_masks.profiling.gradients import mean_gradients
from cpl_masks.profiling.retain import UNCERTAIN, SignMeasure, profile_retain, retain_questions
from cpl_masks.registry import Registry
from cpl_masks.scoring.scorers import make_scorer
from cpl_masks.training.loop import TrainConfig, TrainingLoop
from tests.conftest import make_questions, write_rows
from tests.helpers import snapshot
from tests.test_hub import switch_registry
from tests.test_integrations import TRAIN_ARGS, token_dataset
from tests.test_train import INJECT, MASTERED, fresh, random_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def retain(tiny_model_dir) -> Mask:
    """A retain set of the tiny model over MASTERED, profiled 4 questions a pass."""
    return profile_retain(fresh(tiny_model_dir), MASTERED, scoring="letter", batch_size=4, show_progress=False)


def test_a_retain_set_holds_the_signs_of_g_m_and_its_questions(tiny_model_dir, retain, tmp_path):
    loaded = fresh(tiny_model_dir)
    g_m = mean_gradients(loaded.model, make_scorer("letter", loaded.tokenizer), MASTERED, batch_size=4)
    signs = retain.signs()
    for name, gradient in g_m.items():
        assert torch.equal(signs.sign(name), torch.sign(gradient).to(torch.int8)), name
    counts = retain.metadata["counts"]
    assert counts["positive"] + counts["negative"] <= counts["entries"] == sum(g.numel() for g in g_m.values())
    assert counts["negative"] > 0 and counts["positive"] > 0

    path = retain.save(tmp_path / "retain.safetensors")
    header = read_header(path)
    assert (header["kind"], header["version"], header["id"]) == ("retain", "3.0", retain.id)
    again = Mask.load(path)
    assert again.kind == "retain" and again.id == retain.id
    assert all(torch.equal(again.signs().sign(name), signs.sign(name)) for name in g_m)
    assert retain_questions(again) == MASTERED


def test_a_plain_mask_keeps_its_format_version_and_id(tiny_model_dir, tmp_path):
    mask = random_mask(fresh(tiny_model_dir).model)
    header = read_header(mask.save(tmp_path / "mask.safetensors"))
    assert (header["version"], header.get("kind")) == ("1.0", "mask")  # absent from the file, read as a mask
    assert Mask.load(tmp_path / "mask.safetensors").id == mask.id


def test_the_choices_objective_steers_by_the_margin_not_the_answers_own_loss(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("loglik", loaded.tokenizer)
    table, _ = scorer.choice_scores(loaded.model, MASTERED)
    answers = torch.tensor([question.answer for question in MASTERED])
    expected = -table.float().cpu().log_softmax(-1).gather(1, answers[:, None]).squeeze(1)
    assert torch.allclose(scorer.choice_loss(loaded.model, MASTERED).detach().cpu(), expected, atol=1e-5)
    by_margin = profile_retain(loaded, MASTERED, scoring="loglik", measure=SignMeasure("choices"), show_progress=False)
    by_answer = profile_retain(loaded, MASTERED, scoring="loglik", show_progress=False)
    assert by_margin.metadata["retain"]["objective"] == "choices" and by_margin.id != by_answer.id
    g_m = mean_gradients(loaded.model, scorer, MASTERED, batch_size=16, objective="choices")
    assert all(torch.equal(by_margin.signs().sign(n), torch.sign(g).to(torch.int8)) for n, g in g_m.items())
    context = MethodContext(scorer, retain_questions(by_margin), by_margin)
    with pytest.raises(CplError, match="--objective answer: retain set .* was measured with objective choices"):
        make_method("dynamic", context, {"objective": "answer"})


def test_confident_signs_count_only_where_g_m_exceeds_k_standard_errors(tiny_model_dir):
    """Against each question's own gradient: a sign counts where |mean| > K * std / sqrt(n) (K = 1.5); an
    uncertain entry reads 0 and either lets every step through or disagrees with every non-zero step (frozen)."""
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    per_question = [mean_gradients(loaded.model, scorer, [question], batch_size=1) for question in MASTERED]
    made = {
        uncertain: profile_retain(
            loaded,
            MASTERED,
            scoring="letter",
            measure=SignMeasure(confidence=1.5, uncertain=uncertain),
            show_progress=False,
        )
        for uncertain in UNCERTAIN
    }
    passing, freezing = made["pass"].signs(), made["freeze"].signs()
    checked = frozen = entries = 0
    for name in per_question[0]:
        stacked = torch.stack([gradient[name] for gradient in per_question])
        mean, error = stacked.mean(0), stacked.std(0) / len(MASTERED) ** 0.5
        margin = mean.abs() - 1.5 * error  # (an entry one question alone moves has t = 1 exactly, at n = 5)
        untouched = (mean == 0) & (error == 0)  # the loss does not reach it: no sign, not uncertain
        clear = untouched | ((margin.abs() > 1e-4 * (mean.abs() + error)) & ((error > 1e-9) | (error == 0)))
        significant = margin > 0
        uncertain = ~significant & (error > 0)
        expected = torch.where(significant, mean.sign(), torch.zeros_like(mean)).to(torch.int8)
        step = torch.randn(mean.shape, generator=torch.Generator().manual_seed(len(name)))
        for signs, held in ((passing, torch.zeros_like(uncertain)), (freezing, uncertain)):
            assert torch.equal(signs.sign(name)[clear], expected[clear]), name
            against = ((step * mean < 0) & significant) | held
            assert torch.equal(signs.disagreeing(name, step)[clear], against[clear]), name
        checked, entries = checked + int(clear.sum()), entries + mean.numel()
        frozen += int(uncertain.sum())
    assert checked > 0.99 * entries
    assert frozen > 0 and abs(made["freeze"].metadata["counts"]["frozen"] - frozen) <= entries - checked
    assert made["pass"].metadata["counts"]["frozen"] == 0
    plain = profile_retain(loaded, MASTERED, scoring="letter", show_progress=False).metadata["counts"]
    assert made["pass"].metadata["counts"]["positive"] < plain["positive"]  # some signs did not count
    assert made["freeze"].metadata["retain"] | {"questions": None} == {
        "questions": None,
        "objective": "answer",
        "confidence": 1.5,
        "uncertain": "freeze",
    }


def test_a_refresh_in_any_loop_measures_as_the_retain_set_records(tiny_model_dir):
    """At the weights it was profiled at, a refresh gives back the stored bits: the same loss, confidence and
    treatment of uncertain entries."""
    loaded = fresh(tiny_model_dir)
    measure = SignMeasure(confidence=1.5, uncertain="freeze")
    retain = profile_retain(loaded, MASTERED, scoring="letter", batch_size=4, measure=measure, show_progress=False)
    stored = retain.signs()
    with apply_retain(retain, loaded.model, tokenizer=loaded.tokenizer, batch_size=4) as handle:
        handle.refresh()
        assert handle.measure == measure and handle.signs is not stored
        for planes, expected in ((handle.signs.positive, stored.positive), (handle.signs.negative, stored.negative)):
            assert all(torch.equal(planes[name], expected[name]) for name in retain.names)


def test_a_changed_sign_or_question_is_refused(retain, tmp_path):
    flipped = {name: plane.clone() for name, plane in retain.negative.items()}
    name = next(iter(flipped))
    flipped[name][0] ^= 1  # one entry's sign, in the file's second plane
    forged = Mask(retain.packed, retain.shapes, retain.metadata, negative=flipped)
    path = forged.save(tmp_path / "forged.safetensors")
    raw = path.read_bytes().replace(forged.id.encode(), retain.id.encode())  # claim the original id
    (tmp_path / "claimed.safetensors").write_bytes(raw)
    with pytest.raises(CplError, match="content id mismatch"):
        Mask.load(tmp_path / "claimed.safetensors")

    edited = json.loads(json.dumps(retain.metadata))
    edited["retain"]["questions"][0]["question"] = "something else?"
    with pytest.raises(CplError, match="do not match their recorded sha256"):
        retain_questions(Mask(retain.packed, retain.shapes, edited, negative=retain.negative))
    edited["retain"]["questions"] = "not a list"
    with pytest.raises(CplError, match="not a list of objects"):
        retain_questions(Mask(retain.packed, retain.shapes, edited, negative=retain.negative))


def test_a_retain_set_is_never_used_as_a_freeze_mask_nor_the_reverse(tiny_model_dir, retain):
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    with pytest.raises(CplError, match="is a retain set .*give it as --retain"):
        make_method("mask", MethodContext(scorer, MASTERED, retain, inject=INJECT))
    mask = random_mask(loaded.model)
    with pytest.raises(CplError, match="is a freeze mask, not a retain set"):
        make_method("dynamic", MethodContext(scorer, MASTERED, mask))
    with pytest.raises(CplError, match="is a retain set"):
        combine([retain, mask], "and")
    with pytest.raises(CplError, match="is a retain set"):
        apply_mask(retain, loaded.model)


@pytest.mark.parametrize(
    "measure", [SignMeasure(), SignMeasure("choices"), SignMeasure(confidence=0.5, uncertain="freeze")], ids=str
)
def test_training_from_a_retain_set_equals_the_dynamic_rule_step_for_step(tiny_model_dir, retain, measure):
    """Same refresh schedule (every epoch and every 2 steps), same batch size, same measure: bit-identical
    weights throughout."""
    if measure != SignMeasure():
        retain = profile_retain(
            fresh(tiny_model_dir), MASTERED, scoring="letter", batch_size=4, show_progress=False, measure=measure
        )
    runs = {}
    for source in ("dynamic", "retain"):
        loaded = fresh(tiny_model_dir)
        scorer = make_scorer("letter", loaded.tokenizer)
        mastered = MASTERED if source == "dynamic" else retain_questions(retain)
        context = MethodContext(scorer, mastered, retain if source == "retain" else None, batch_size=4)
        options = {"refresh_every": 2, **(measure.to_metadata() if source == "dynamic" else {})}
        method = make_method("dynamic", context, options)
        trainer = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.5, optimizer="sgd", show_progress=False))
        steps: list[dict[str, torch.Tensor]] = []
        original = method.mask_gradients

        def record(model, original=original, steps=steps):
            original(model)
            steps.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

        method.mask_gradients = record  # each step's masked gradient, as the optimizer sees it
        for epoch in (1, 2):
            trainer.train_epoch(INJECT, epoch)
        runs[source] = (steps, snapshot(loaded.model))
    (dynamic_steps, dynamic_weights), (retain_steps, retain_weights) = runs["dynamic"], runs["retain"]
    assert len(dynamic_steps) == len(retain_steps) == 2 * len(INJECT)
    for step, (expected, actual) in enumerate(zip(dynamic_steps, retain_steps, strict=True)):
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[name], actual[name]) for name in expected), f"step {step}"
    assert all(torch.equal(dynamic_weights[name], retain_weights[name]) for name in dynamic_weights)
    assert any((step[name] == 0).any() for step in dynamic_steps for name in step)  # the rule did zero entries


def test_a_run_that_never_refreshes_steers_by_the_stored_signs_to_the_end_resumed_or_not(
    tiny_model_dir, retain, monkeypatch
):
    import cpl_masks.profiling.retain as reference  # where the rule's signs are measured

    refreshes = []
    original = reference.mean_gradients
    monkeypatch.setattr(reference, "mean_gradients", lambda *a, **k: refreshes.append(1) or original(*a, **k))
    loaded = fresh(tiny_model_dir)
    scorer = make_scorer("letter", loaded.tokenizer)
    context = MethodContext(scorer, retain_questions(retain), retain, batch_size=4)
    never = make_method("dynamic", context, {"refresh_every": 0})
    trainer = TrainingLoop(loaded.model, scorer, never, TrainConfig(lr=0.5, optimizer="sgd", show_progress=False))
    before = snapshot(loaded.model)
    for epoch in (1, 2):
        trainer.train_epoch(INJECT, epoch)
    resumed = make_method("dynamic", context, {"refresh_every": 0})
    resumed.before_step(loaded.model, 3, 0)  # a run resumed at epoch 3, at weights the signs were not measured at
    assert refreshes == []
    assert any(not torch.equal(before[name], weight) for name, weight in snapshot(loaded.model).items())
    stored = retain.signs()
    for method in (never, resumed):
        assert all(torch.equal(method.reference.value.sign(name), stored.sign(name)) for name in stored.positive)


def test_never_refreshing_needs_stored_signs_and_is_refused_before_the_model_loads(split_files, tmp_path):
    inject, mastered, _ = split_files
    common = ["--data", str(inject), "--model", str(tmp_path / "no-model"), "--refresh-every", "0"]
    train = ["train", "--mastered", str(mastered), "--out", str(tmp_path / "run"), "--method"]
    sweep = ["sweep", "--out", str(tmp_path / "sweep"), "--lr-grid", "1e-4", "--methods"]
    for mode, refused in (("dynamic", "--refresh-every 0 needs --retain"), ("agem", "agem keeps g_M itself")):
        for command in ([*train, mode], [*sweep, f"full,{mode}"]):
            result = runner.invoke(app, [*command, *common])
            assert result.exit_code == 2 and refused in result.output, (command, result.output)
            assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.fixture
def split_files(tmp_path):
    inject = write_rows(tmp_path / "inject.jsonl", [q.to_record() for q in INJECT[:4]])
    (tmp_path / "task").mkdir()
    mastered = write_rows(tmp_path / "task" / "mastered.jsonl", [q.to_record() for q in MASTERED])
    other = write_rows(tmp_path / "other.jsonl", [q.to_record() for q in make_questions(4, 41, "o")])
    return inject, mastered, other


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_profile_retain_then_train_with_it_keeping_each_refresh(tiny_model_dir, split_files, tmp_path):
    inject, mastered, other = split_files
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--threads", "1"]
    made = invoke(["profile", "--kind", "retain", "--mastered", str(mastered), "--scoring", "letter", *common])
    assert made.exit_code == 0, made.output
    assert "retain set" in made.output and "g_M < 0" in made.output
    name = f"{tiny_model_dir.name}/task.retain"
    shown = Registry().show(name)
    assert shown["source"] == "retain" and shown["ref"].endswith(".retain@v1")
    inspected = invoke(["inspect", name, "--json"])
    assert json.loads(inspected.output)["kind"] == "retain", inspected.output
    assert "g_M = 0" in invoke(["inspect", name]).output
    refused = runner.invoke(app, ["inspect", name, "--plot", str(tmp_path / "p.png")])
    assert refused.exit_code == 2 and "is a retain set" in refused.output

    def train(out: str, evaluated, *options: str):
        args = ["train", "--inject", str(inject), "--mastered", str(evaluated), "--out", str(tmp_path / out), *common]
        return invoke([*args, "--epochs", "2", "--lr", "0.5", "--optimizer", "sgd", *options])

    # reused on another task: forgetting is measured on other questions, the rule steers by the retain set's
    trained = train("with-retain", other, "--retain", name, "--keep-signs")
    assert trained.exit_code == 0, trained.output
    run = json.loads((tmp_path / "with-retain" / "run.json").read_text())
    assert run["mode"] == "dynamic" and run["mask_id"] == shown["id"] and run["method"]["retain_id"] == shown["id"]
    assert [(row["epoch"], row["step"]) for row in run["made_masks"]] == [(2, 0)]  # epoch 1 took the stored signs
    child = Mask.load(run["made_masks"][0]["path"])
    assert child.kind == "retain" and child.metadata["parents"] == [shown["id"]]
    [registered_child] = Registry().lineage(name)["children"]
    assert registered_child["id"] == child.id and ".retain.reprofiled@" in registered_child["ref"]
    assert [item["out_dir"] for item in Registry().runs(mask=name)] == [run["out_dir"]]

    # the paper's rule steered by the same questions given as --mastered: the very same weights
    direct = train("direct", mastered, "--method", "dynamic")
    assert direct.exit_code == 0, direct.output
    expected, actual = (load_file(tmp_path / out / "model" / "model.safetensors") for out in ("direct", "with-retain"))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_confident_retain_set_from_the_cli_trains_as_it_was_measured(tiny_model_dir, split_files, tmp_path):
    inject, mastered, _ = split_files
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--threads", "1"]
    path = tmp_path / "confident.safetensors"
    args = ["profile", "--kind", "retain", "--mastered", str(mastered), "--scoring", "letter", "--out", str(path)]
    made = invoke([*args, "--confidence", "1.5", "--uncertain", "freeze", *common])
    assert made.exit_code == 0, made.output
    assert "1.5 standard errors" in made.output and "uncertain: frozen" in made.output
    counts = Mask.load(path).metadata["counts"]
    assert 0 < counts["frozen"] <= min(counts["positive"], counts["negative"])

    train = ["train", "--inject", str(inject), "--mastered", str(mastered), "--retain", str(path), *common]
    train += ["--epochs", "1", "--lr", "0.5", "--optimizer", "sgd"]
    refused = runner.invoke(app, [*train, "--confidence", "2", "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--confidence 2.0: retain set" in refused.output
    assert "was measured with confidence 1.5" in refused.output and not (tmp_path / "refused").exists()
    trained = invoke([*train, "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["method"]["sign_measure"] == {"objective": "answer", "confidence": 1.5, "uncertain": "freeze"}


def test_the_wrong_kind_is_refused_in_one_line_before_the_model_loads(tiny_model_dir, split_files, tmp_path, retain):
    inject, mastered, _ = split_files
    path = retain.save(tmp_path / "retain.safetensors")
    common = ["--data", str(inject), "--mastered", str(mastered), "--model", str(tiny_model_dir), "--device", "cpu"]
    result = runner.invoke(app, ["train", *common, "--mask", str(path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "is a retain set" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "a").exists()
    mask = random_mask(fresh(tiny_model_dir).model).save(tmp_path / "mask.safetensors")
    result = runner.invoke(app, ["train", *common, "--retain", str(mask), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "is a freeze mask, not a retain set" in result.output
    result = runner.invoke(
        app, ["train", *common, "--retain", str(path), "--method", "full", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 2 and "--retain trains with the per-step rule" in result.output
    result = runner.invoke(app, ["profile", "--kind", "retain", "--mastered", str(mastered), "--inject", str(inject)])
    assert result.exit_code == 2 and "takes no --inject" in result.output
    args = ["profile", "--kind", "retain", "--mastered", str(mastered), "--objective", "margin"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--objective margin: choose one of answer, choices" in result.output
    result = runner.invoke(
        app, ["profile", "--mastered", str(mastered), "--inject", str(inject), "--objective", "choices"]
    )
    assert result.exit_code == 2 and "--objective applies to --kind retain" in result.output
    result = runner.invoke(
        app, ["profile", "--mastered", str(mastered), "--inject", str(inject), "--uncertain", "pass"]
    )
    assert result.exit_code == 2 and "--uncertain applies to --kind retain" in result.output
    args = ["profile", "--kind", "retain", "--mastered", str(mastered), "--uncertain", "freeze"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--uncertain freeze needs --confidence" in result.output
    result = runner.invoke(app, [*args, "--confidence", "-1"])
    assert result.exit_code == 2 and "--confidence -1.0: must be a finite number >= 0" in result.output
    result = runner.invoke(app, ["diff", str(path), str(mask)])
    assert result.exit_code == 2 and "is a retain set" in result.output


def test_a_retain_set_is_pushed_and_pulled_as_a_retain_set(server, retain, tmp_path, monkeypatch):
    name = Registry().register(retain.save(tmp_path / "retain.safetensors"), task="facts")
    assert name.endswith("/facts.retain@v1")
    pushed = runner.invoke(app, ["push", name, "--repo-id", "me/facts-retain"])
    assert pushed.exit_code == 0, pushed.output
    repo = server.hub.repos["me/facts-retain"]
    files = repo.commits[repo.branches["main"]]
    card = files["README.md"].decode()
    assert "retain set" in card and "--retain" in card
    assert f"| signs | {markdown_text('answer loss, every sign')} |" in card  # cells escaped for Markdown
    assert json.loads(files["provenance.json"])["kind"] == "retain" and "per_layer.png" not in files

    switch_registry(tmp_path, monkeypatch, "elsewhere")
    pulled = runner.invoke(app, ["pull", "me/facts-retain"])
    assert pulled.exit_code == 0, pulled.output
    [row] = Registry().list_masks()
    assert row["ref"].endswith("/hub.me.facts-retain.retain@v1") and row["source"] == "retain"
    again = Mask.load(Registry().resolve(row["ref"]))
    assert again.id == retain.id and retain_questions(again) == MASTERED


def sgd_trainer(tiny_model_dir, tmp_path):
    """A transformers Trainer of the tiny model: plain SGD at lr 1, 2 epochs of 2 steps, no clipping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers import Trainer as HFTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    args = {**TRAIN_ARGS, "max_steps": -1, "num_train_epochs": 2, "optim": "sgd", "weight_decay": 0.0}
    args.update(learning_rate=1.0, max_grad_norm=0.0, gradient_accumulation_steps=1, per_device_train_batch_size=4)
    return HFTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "trainer"), **args),
        train_dataset=token_dataset(tokenizer),
        processing_class=tokenizer,
    )


def test_a_trainer_steps_only_along_entries_that_agree_with_g_m_and_refreshes_each_epoch(tiny_model_dir, tmp_path):
    """SGD without momentum: each step moves an entry only where -update agrees in sign with the current g_M."""
    from transformers import TrainerCallback

    trainer = sgd_trainer(tiny_model_dir, tmp_path)
    model = trainer.model
    retain = profile_retain(fresh(tiny_model_dir), MASTERED, scoring="letter", batch_size=4, show_progress=False)
    handle = retain.apply(trainer)
    signs_at = [handle.signs]  # the stored signs, then each refresh's
    updates = []

    class Watch(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.before = snapshot(model)

        def on_step_end(self, *_, **__):
            updates.append((handle.signs, {n: p.detach() - self.before[n] for n, p in model.named_parameters()}))

    trainer.add_callback(Watch())
    trainer.train()
    assert handle.refreshes == 1  # the second epoch's start; 2 steps an epoch
    assert len(updates) == 4 and updates[0][0] is signs_at[0] and updates[2][0] is not signs_at[0]
    for signs, update in updates:
        for name, delta in update.items():
            against = (delta.sign() * signs.sign(name)) > 0  # -update = lr * g disagrees with g_M
            assert not against.any(), name
    assert any(delta.abs().sum() > 0 for _, update in updates for delta in update.values())
    handle.remove()
    assert not trainer.callback_handler.callbacks or all(
        type(callback).__name__ != "SignRefreshCallback" for callback in trainer.callback_handler.callbacks
    )


def test_a_trainer_refreshes_on_the_training_loops_schedule(tiny_model_dir, tmp_path, retain):
    """2 epochs of 2 steps, every step: due before every step but the run's first, as in the loop."""
    from cpl_masks.methods.base import ScheduleOptions

    trainer = sgd_trainer(tiny_model_dir, tmp_path)
    handle = apply_retain(retain, trainer, refresh_every=1)
    trainer.train()
    schedule = ScheduleOptions(refresh_every=1)
    due = [(epoch, step) for epoch in (1, 2) for step in (0, 1) if schedule.due(epoch, step)]
    assert handle.refreshes == len(due) - 1 == 3


def test_a_trainer_that_never_refreshes_keeps_the_stored_signs(tiny_model_dir, tmp_path, retain):
    trainer = sgd_trainer(tiny_model_dir, tmp_path)
    before = snapshot(trainer.model)
    handle = apply_retain(retain, trainer, refresh_every=0)
    stored = handle.signs
    trainer.train()
    assert handle.refreshes == 0 and handle.signs is stored
    assert any(not torch.equal(before[name], weight) for name, weight in snapshot(trainer.model).items())
    with pytest.raises(CplError, match=r"^--refresh-every -1: must be at least 1 \(or 0: never\)$"):
        apply_retain(retain, trainer, refresh_every=-1)
