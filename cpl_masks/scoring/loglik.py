"""``loglik`` / ``loglik-norm`` scoring: each choice's text scored as a continuation of the question.

A question's context runs once and every choice's continuation from it, in one packed sequence per
question with a block attention mask (the shared path; see :class:`LoglikScorer`); the old
one-sequence-per-choice path is kept as the fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.scoring.base import Scorer, model_config, pad_left, parameter_dtype, text_config

LOGLIK_PATHS = ("shared", "per-choice")  # how loglik scoring runs a question's choices: see LoglikScorer
SHARED_ATTENTION = ("eager", "sdpa")  # attention implementations that take a custom 4D mask


@dataclass(frozen=True)
class SharedLayout:
    """A question packed for the shared-context path: its choices' common prefix once, then each choice's branch.

    ``ids`` holds the ``prefix`` tokens every choice's row starts with (the context, BOS included),
    followed by each choice's branch of ``branches[c]`` tokens (the rest of its row). A choice's
    scored tokens are the last ``counts[c]`` of its branch: the same tokens, with the same ids, as its
    per-choice row's continuation, so both paths score the same thing.
    """

    ids: tuple[int, ...]
    prefix: int
    branches: tuple[int, ...]
    counts: tuple[int, ...]


def sliding_window(model: Any) -> int | None:
    """The model's sliding attention window in tokens (Gemma 3, Mistral...), or None where it has none."""
    window = getattr(text_config(model), "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _layer_types(model: Any) -> frozenset[str] | None:
    """The kinds of attention the model's layers use (``full_attention``, ``sliding_attention``...), if known."""
    types = getattr(text_config(model), "layer_types", None)
    return frozenset(types) if types else None


def _shared_attention_mask(model: Any, allowed: torch.Tensor, positions: torch.Tensor) -> Any:
    """The additive attention mask (B, 1, T, T) for ``allowed`` (B, T, T), per layer kind where the model mixes them.

    A model whose config lists sliding and full attention layers (Gemma 3) gets one mask per kind,
    the sliding one also hiding keys ``window`` or more positions back, which its forward takes as a
    dict; one whose layers all slide gets the windowed mask. Where the config does not say which
    layers slide (a window but no ``layer_types``), only questions that fit in the window share
    their context, so the plain mask is right for them.
    """
    dtype = parameter_dtype(model)

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)[:, None]

    window, types = sliding_window(model), _layer_types(model)
    if (
        window is None
        or types is None
        or not types <= {"full_attention", "sliding_attention"}
        or types == {"full_attention"}
    ):
        return additive(allowed)  # for unknown layer kinds, uses_shared_path keeps questions past the window away
    near = (positions[:, :, None] - positions[:, None, :]) < window  # (B, T, T) key within the window
    if types == {"sliding_attention"}:
        return additive(allowed & near)
    return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & near)}


class LoglikScorer(Scorer):
    """lm-eval style scoring: each choice's text scored as a continuation of the question.

    ``path`` says how :meth:`choice_scores` runs the model (:meth:`loss` always runs the correct
    choice's own sequence):

    * ``"shared"`` (default): one packed sequence per question, the context once and then every
      choice's continuation, with a 4D attention mask that lets each choice see the context and not
      the other choices, and position ids that restart after the context. A 4-choice question costs
      about a quarter of the per-choice path's tokens when its text is long.
    * ``"per-choice"``: one left-padded sequence per (question, choice) pair.

    The shared path is checked once per model against the per-choice path on one question; where
    the model's attention takes no 4D mask or the scores disagree, the scorer warns once and uses the
    per-choice path for that model. Sliding-window layers get the window in their mask (one mask per
    layer kind, as Gemma 3's forward takes them); where the config does not say which layers slide,
    a batch with a question longer than the window is scored per choice, with a warning.
    """

    def __init__(self, tokenizer: Any, normalize: bool, *, path: str = "shared") -> None:
        super().__init__(tokenizer)
        if path not in LOGLIK_PATHS:
            raise CplError(f"loglik path {path!r}: choose one of {', '.join(LOGLIK_PATHS)}")
        self.normalize = normalize
        self.path = path
        self.name = "loglik-norm" if normalize else "loglik"
        self._row_ids = functools.lru_cache(maxsize=None)(self._build_row_ids)
        self._layout = functools.lru_cache(maxsize=None)(self._build_layout)
        self._shared_works: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._warned_window = False

    @staticmethod
    def context_text(question: Question) -> str:
        """The text each choice continues."""
        body = question.question if question.preformatted else f"Question: {question.question}"
        return f"{body}\nAnswer:"

    def _build_row_ids(self, question: Question, choice: int) -> tuple[tuple[int, ...], int]:
        context = self.context_text(question)
        context_ids = self._bos() + self._encode(context)
        full_ids = self._bos() + self._encode(f"{context} {question.choices[choice]}")
        continuation = len(full_ids) - len(context_ids)
        if continuation < 1 or full_ids[: len(context_ids)] != context_ids:
            continuation = len(self._encode(f" {question.choices[choice]}"))
        return tuple(full_ids), continuation

    def _build_layout(self, question: Question) -> SharedLayout:
        rows = [self._row_ids(question, choice) for choice in range(len(question.choices))]
        heads = [ids[: len(ids) - count] for ids, count in rows]  # what each choice's scored tokens follow
        prefix = 0
        while all(len(head) > prefix and head[prefix] == heads[0][prefix] for head in heads):
            prefix += 1
        ids = heads[0][:prefix] + tuple(token for row, _ in rows for token in row[prefix:])
        return SharedLayout(ids, prefix, tuple(len(row) - prefix for row, _ in rows), tuple(c for _, c in rows))

    def sequence_length(self, question: Question) -> int:
        """The context followed by the question's longest choice."""
        return max(len(self._row_ids(question, choice)[0]) for choice in range(len(question.choices)))

    def batch_key(self, question: Question) -> int:
        """Tokens of the question's packed sequence (context once, then every choice)."""
        return len(self._layout(question).ids)

    def _token_nll(self, model: Any, rows: list[tuple[tuple[int, ...], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood (R,) of each row's continuation, and its token count (R,)."""
        batch = pad_left([ids for ids, _ in rows], self.tokenizer.pad_token_id, model.device)
        keep = max(count for _, count in rows) + 1
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (R, keep, V), rows end together
        picks = _Picks()
        for row, (ids, count) in enumerate(rows):
            for back in range(count, 0, -1):  # token ids[-back] is predicted at kept position keep-1-back
                picks.add(row, keep - 1 - back, ids[-back], row)
        return picks.nll(logits, len(rows))

    def _shared_nll(self, model: Any, layouts: list[SharedLayout]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood (R,) of every choice of every question, in order, and token counts (R,).

        One forward pass over the batch's packed sequences, left-padded. A branch token sits at the
        position it has in its choice's own row; a choice's first scored token is predicted by the
        prefix's last token when its branch is just the continuation, else by the branch token before it.
        """
        width = max(len(layout.ids) for layout in layouts)
        keep = max(len(layout.ids) - layout.prefix for layout in layouts) + 1  # from the last prefix token on
        input_ids = torch.full((len(layouts), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        position_ids = torch.zeros((len(layouts), width), dtype=torch.long)  # (B, T)
        segment = torch.full((len(layouts), width), -1, dtype=torch.long)  # (B, T) -1 pad, 0 prefix, c+1 choice c
        picks, counts = _Picks(), []
        for row, layout in enumerate(layouts):
            offset = width - len(layout.ids)  # left padding
            input_ids[row, offset:] = torch.tensor(layout.ids, dtype=torch.long)
            position_ids[row, offset : offset + layout.prefix] = torch.arange(layout.prefix)
            segment[row, offset : offset + layout.prefix] = 0
            start = offset + layout.prefix
            for choice, (length, count) in enumerate(zip(layout.branches, layout.counts)):
                position_ids[row, start : start + length] = torch.arange(layout.prefix, layout.prefix + length)
                segment[row, start : start + length] = choice + 1
                for index in range(start + length - count, start + length):
                    predictor = index - 1 if index > start else offset + layout.prefix - 1
                    picks.add(row, predictor - (width - keep), layout.ids[index - offset], len(counts))
                counts.append(count)
                start += length
        real = segment >= 0  # (B, T)
        causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T) key at or before query
        visible = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # (B, T, T) own or prefix
        allowed = causal & visible & real[:, :, None] & real[:, None, :]  # (B, T query, T key)
        allowed |= torch.eye(width, dtype=torch.bool)  # a pad query sees itself, so no softmax row is empty
        mask = _shared_attention_mask(model, allowed, position_ids)  # (B, 1, T, T) additive: 0 seen, min hidden
        device = model.device
        mask = {kind: m.to(device) for kind, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask,
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits  # (B, keep, V)
        return picks.nll(logits, len(counts))

    def uses_shared_path(self, model: Any, questions: Sequence[Question]) -> bool:
        """Whether :meth:`choice_scores` runs these questions through the shared-context path on this model.

        The first time a model is asked, the shared path is checked against the per-choice path on
        the shortest question with a multi-token choice; a model that fails (or whose attention takes
        no 4D mask) gets a warning and the per-choice path from then on.
        """
        if self.path != "shared":
            return False
        window = sliding_window(model)
        types = _layer_types(model)
        expressible = types is not None and types <= {"full_attention", "sliding_attention"}
        if window is not None and not expressible and any(self.sequence_length(q) > window for q in questions):
            if not self._warned_window:
                warnings.warn(
                    f"loglik scoring: questions longer than the model's sliding attention window ({window} tokens)"
                    " are scored one sequence per choice",
                    stacklevel=3,
                )
                self._warned_window = True
            return False
        if model not in self._shared_works:
            probe = self._probe_question(questions)
            if probe is None:  # every choice is read off the context's last position, which no mask can get wrong
                return True
            self._shared_works[model] = self._check_shared(model, probe)
        return self._shared_works[model]

    def _probe_question(self, questions: Sequence[Question]) -> Question | None:
        """The shortest question with a multi-token choice, that choice moved last, or None if there is none.

        Only a choice scored after another choice's branch can show a mask the model ignored.
        """
        candidates = [q for q in questions if max(self._layout(q).branches) > 1]
        if not candidates:
            return None
        question = min(candidates, key=self.batch_key)
        branches = self._layout(question).branches
        order = sorted(range(len(branches)), key=branches.__getitem__)  # longest branch last
        choices = tuple(question.choices[choice] for choice in order)
        return dataclasses.replace(question, choices=choices, answer=order.index(question.answer))

    @torch.no_grad()
    def _check_shared(self, model: Any, question: Question) -> bool:
        reason = self._shared_problem(model, question)
        if reason is None:
            return True
        warnings.warn(
            f"loglik scoring of {type(model).__name__} falls back to one sequence per choice: {reason}", stacklevel=4
        )
        return False

    def _shared_problem(self, model: Any, question: Question) -> str | None:
        """Why the shared path cannot score this model, or None when it scores the question as the per-choice path."""
        implementation = getattr(model_config(model), "_attn_implementation", None)
        if implementation not in SHARED_ATTENTION:
            return f"its attention implementation ({implementation}) takes no 4D attention mask"
        try:
            shared, counts = self._shared_nll(model, [self._layout(question)])  # (C,) each
        except Exception as error:  # any model that cannot take the packed batch falls back
            return f"it cannot take the packed sequence ({type(error).__name__}: {str(error)[:200]})"
        single, _ = self._token_nll(model, [self._row_ids(question, c) for c in range(len(question.choices))])
        per_token = 2e-4 if parameter_dtype(model) == torch.float32 else 2e-2  # rounding, far below a real gap
        gap = float(((shared - single).abs() / counts).max())
        if gap <= per_token:
            return None
        return f"its shared-context scores differ from the per-choice scores by {gap:.3g} nats a token"

    def loss(self, model: Any, questions: Sequence[Question]) -> torch.Tensor:
        total, counts = self._token_nll(model, [self._row_ids(q, q.answer) for q in questions])
        return total / counts

    def choice_table(self, model: Any, questions: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uses_shared_path(model, questions):
            total, counts = self._shared_nll(model, [self._layout(q) for q in questions])  # (R,) each
        else:
            rows = [self._row_ids(q, c) for q in questions for c in range(len(q.choices))]
            total, counts = self._token_nll(model, rows)  # (R,) each
        scores = -(total / counts if self.normalize else total)  # (R,)
        width = max(len(q.choices) for q in questions)
        table = torch.full((len(questions), width), float("-inf"), device=scores.device, dtype=scores.dtype)  # (B, C)
        losses, start = [], 0
        for row, q in enumerate(questions):
            table[row, : len(q.choices)] = scores[start : start + len(q.choices)]
            losses.append(total[start + q.answer] / counts[start + q.answer])
            start += len(q.choices)
        return table, torch.stack(losses)


class _Picks:
    """The scored tokens of a batch: where each one's logits are, its target id, and whose score it adds to."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.columns: list[int] = []
        self.targets: list[int] = []
        self.owners: list[int] = []

    def add(self, row: int, column: int, target: int, owner: int) -> None:
        self.rows.append(row)
        self.columns.append(column)
        self.targets.append(target)
        self.owners.append(owner)

    def nll(self, logits: torch.Tensor, owners: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood (owners,) and scored-token count (owners,), from logits (B, T, V).

        The picked rows are gathered into one contiguous (N, V) float32 block before the log-softmax:
        a cross-entropy over the class dimension of a (B, V, T) view, as this scorer used to compute it,
        is ~1e-4 nats per token less accurate on CPU (2e-3 on a 20-token answer).
        """
        device = logits.device
        rows, columns = torch.tensor(self.rows, device=device), torch.tensor(self.columns, device=device)
        owner = torch.tensor(self.owners, device=device)  # (N,)
        picked = logits[rows, columns].float()  # (N, V)
        nll = F.cross_entropy(picked, torch.tensor(self.targets, device=device), reduction="none")  # (N,)
        total = torch.zeros(owners, device=device, dtype=nll.dtype).index_add(0, owner, nll)  # (owners,)
        return total, torch.bincount(owner, minlength=owners).to(nll.dtype)
