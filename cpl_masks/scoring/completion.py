"""Scoring a free-form item: its completion loss, and whether greedy decoding reproduces the completion.

An item becomes tokens the way TRL's ``SFTTrainer`` tokenizes it: a text, or a prompt and its
completion, through the tokenizer with its special tokens and an EOS after the completion (trained
on, not part of what greedy decoding must reproduce); a conversation through the tokenizer's own
chat template, the assistant turns (or the completion's messages) up to their end-of-turn token
being the completion. The loss is the mean cross-entropy of the completion tokens
(``loss_on="completion"``, SFTTrainer's default) or of every token (``"all"``); a ``text`` item's
completion is the whole text.

The outcome takes one teacher-forced forward pass: the item is right when every completion token
is the argmax after the tokens before it, which is exactly when greedy decoding from the prompt
reproduces the completion (tested against ``model.generate``). Beside it, as for multiple choice,
two continuous measures: the completion's mean log-probability and its smallest per-token margin
(the target's log-probability minus the best other token's; negative when a token is missed).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cpl_masks.data.completions import TEXT, Body, Completion
from cpl_masks.errors import CplError
from cpl_masks.scoring.base import Outcome, Scorer, pad_left

LOSS_ON = ("completion", "all")  # which tokens a free-form item's training loss covers
DEFAULT_LOSS_ON = "completion"
LOSS_ON_HELP = "free-form items' loss covers: completion (the completion / assistant tokens, TRL's default) or all"


@dataclass(frozen=True)
class Encoded:
    """An item's tokens and which of them are scored: ``completion`` (the outcome's) and ``loss`` positions."""

    ids: tuple[int, ...]
    completion: tuple[int, ...]
    loss: tuple[int, ...]


def check_loss_on(loss_on: str, option: str = "--loss-on") -> str:
    """Refuse a ``--loss-on`` that is none of :data:`LOSS_ON`, naming the option."""
    if loss_on not in LOSS_ON:
        raise CplError(f"{option} {str(loss_on)[:40]}: choose one of {', '.join(LOSS_ON)}")
    return loss_on


class CompletionScorer(Scorer):
    """Scores free-form items (:class:`~cpl_masks.data.completions.Completion`): completion loss and greedy match."""

    name = "completion"
    too_long = "prompt and completion are {tokens} tokens"

    def __init__(self, tokenizer: Any, loss_on: str = DEFAULT_LOSS_ON) -> None:
        super().__init__(tokenizer)
        self.loss_on = check_loss_on(loss_on)
        self.encode = functools.lru_cache(maxsize=None)(self._build)

    def sequence_length(self, question: Completion) -> int:
        """The prompt and the completion, with the special tokens and template around them."""
        return len(self.encode(question).ids)

    def _build(self, item: Completion) -> Encoded:
        ids, completion, trained = self._conversation(item) if item.conversational else self._standard(item)
        if not completion:
            raise CplError(f"{item.where}: the completion has no tokens")
        loss = tuple(range(1, len(ids))) if self.loss_on == "all" else trained
        return Encoded(tuple(ids), completion, loss)

    def _standard(self, item: Completion) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
        """A text, or a prompt and its completion, tokenized as one text (TRL's way), and EOS after it.

        The EOS is trained on (as TRL appends it) but is not part of the completion greedy decoding must
        reproduce: the completion is the text the row holds. Where the prompt's own tokens are not the start
        of the whole text's (a merge across the seam), the prompt and completion are tokenized apart and
        joined, so the prompt the model reads is the prompt's.
        """
        prompt, completion = str(item.prompt), str(item.completion)
        whole = self.tokenizer(prompt + completion)["input_ids"]
        head = self.tokenizer(prompt)["input_ids"] if prompt else []
        if whole[: len(head)] != head:
            whole = head + self._encode(completion)
        start = 1 if item.form == TEXT else max(len(head), 1)
        eos = self.tokenizer.eos_token_id
        completion = tuple(range(start, len(whole)))
        if eos is None or whole[-1:] == [eos]:
            return whole, completion, completion
        return [*whole, eos], completion, (*completion, len(whole))

    def _conversation(self, item: Completion) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
        """A conversation rendered by the chat template; the scored spans are the completion's turns.

        Each span is where the rendered text grows from the conversation before it (with the generation
        prompt) to the conversation through it, up to the turn's end token (the whitespace after it is not
        what greedy decoding stops at), so the template decides every token around the turns.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise CplError(f"{item.where}: a conversational row needs a chat template, and the tokenizer has none")
        prompt = () if isinstance(item.prompt, str) else item.prompt
        turns = (*prompt, *item.completion)
        if prompt:  # prompt-completion: the completion's messages, together
            blocks = [(len(prompt), len(turns))]
        else:  # messages: every assistant turn
            blocks = [(index, index + 1) for index, (role, _) in enumerate(turns) if role == "assistant"]
        whole = self._render(item, turns, generation=False)
        cuts = [0]
        for start, end in blocks:
            before = self._render(item, turns[:start], generation=True)
            through = self._render(item, turns[:end], generation=False)
            if not (through.startswith(before) and whole.startswith(through) and len(before) >= cuts[-1]):
                raise CplError(
                    f"{item.where}: the tokenizer's chat template does not render this conversation turn by turn;"
                    " write it as prompt-completion rows"
                )
            cuts += [len(before), len(through.rstrip())]  # the newline after a turn's end is not generated
        cuts.append(len(whole))
        ids: list[int] = []
        completion: list[int] = []
        for index, (start, end) in enumerate(itertools.pairwise(cuts)):
            tokens = self._encode(whole[start:end])
            if index % 2:  # odd pieces are the completion's turns
                completion += range(max(len(ids), 1), len(ids) + len(tokens))
            ids += tokens
        return ids, tuple(completion), tuple(completion)

    def _render(self, item: Completion, turns: Body, *, generation: bool) -> str:
        """The chat template's text of ``turns``; a template that refuses them is a one-line error naming the row."""
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as error:  # a template raises its own errors (role order, unknown roles) as it likes
            raise CplError(f"{item.where}: the chat template refused the conversation: {str(error)[:160]}") from None

    def _logprobs(self, model: Any, items: Sequence[Completion], use: str) -> tuple[list[Encoded], torch.Tensor, Any]:
        """Log-probabilities (N, V) at each item's ``use`` positions (``loss`` or ``completion``), in item order.

        One left-padded forward pass; only the logits from the first scored position on are kept.
        """
        encoded = [self.encode(item) for item in items]
        batch = pad_left([e.ids for e in encoded], self.tokenizer.pad_token_id, model.device)
        keep = max(len(e.ids) - min(getattr(e, use)) + 1 for e in encoded)
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (B, keep, V), rows end together
        rows, columns, targets = [], [], []
        for row, e in enumerate(encoded):
            for position in getattr(e, use):  # predicted by the kept logits one position before it
                rows.append(row)
                columns.append(keep - len(e.ids) + position - 1)
                targets.append(e.ids[position])
        device = logits.device
        picked = logits[torch.tensor(rows, device=device), torch.tensor(columns, device=device)].float()  # (N, V)
        return encoded, picked.log_softmax(-1), torch.tensor(targets, device=device)

    def loss(self, model: Any, questions: Sequence[Completion]) -> torch.Tensor:
        """Per-item mean cross-entropy of the loss tokens, shape (B,), with gradients."""
        encoded, logprobs, targets = self._logprobs(model, questions, "loss")
        nll = -logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
        return torch.stack([part.mean() for part in nll.split([len(e.loss) for e in encoded])])

    def choice_table(self, model: Any, questions: Sequence[Completion]) -> tuple[torch.Tensor, torch.Tensor]:
        """Refused: a free-form item has no choices, so no choice loss (``--objective choices``)."""
        raise CplError(f"{questions[0].where}: a free-form item has no choices; use --objective answer for it")

    @torch.no_grad()
    def outcomes(self, model: Any, questions: Sequence[Completion]) -> list[Outcome]:
        """Per item: tokens reproduced before the first miss, whether all are, loss, mean logprob, smallest margin."""
        encoded, logprobs, targets = self._logprobs(model, questions, "loss")
        target = logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
        best_other = logprobs.scatter(1, targets[:, None], float("-inf")).max(-1).values  # (N,)
        hit = logprobs.argmax(-1) == targets  # (N,) the target is greedy decoding's pick
        results = []
        for e, lp, lead, right in zip(
            encoded, *(t.cpu().split([len(e.loss) for e in encoded]) for t in (target, target - best_other, hit))
        ):
            row_of = {position: row for row, position in enumerate(e.loss)}
            chosen = torch.tensor([row_of[position] for position in e.completion])  # the completion's rows
            hits = right[chosen]
            reproduced = int(hits.long().cumprod(0).sum())
            results.append(
                (reproduced, bool(hits.all()), float(-lp.mean()), float(lp[chosen].mean()), float(lead[chosen].min()))
            )
        return results
