"""The one training loop every method runs through, and the optimizers it steps.

A *method* (:mod:`cpl_masks.methods`) is a small strategy object the loop calls at fixed points, so
all methods share data order, loss, optimizer and evaluation and their comparison is fair.

Frozen entries stay bit-identical with every optimizer: SGD and momentum see zero gradients there
(so their momentum buffers stay zero) and weight decay is folded into the gradient *before* the
mask; with a static mask AdamW is :class:`MaskedAdamW`, which keeps its moments only for the
collaborative entries and writes nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cpl_masks.data import Question
from cpl_masks.errors import CplError
from cpl_masks.methods import Method
from cpl_masks.progress import progress_bar
from cpl_masks.scoring import Scorer, batches

OPTIMIZERS = ("sgd", "momentum", "adamw")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all recorded in ``run.json``)."""

    epochs: int = 3
    lr: float = 1e-4
    optimizer: str = "sgd"
    batch_size: int = 1
    eval_batch_size: int = 16
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0
    show_progress: bool = True

    def check(self) -> None:
        """Refuse values that cannot train, naming the option."""
        if self.epochs < 1:
            raise CplError(f"--epochs {self.epochs}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CplError(f"--lr {self.lr}: must be a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise CplError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        for option, value in (("--batch-size", self.batch_size), ("--eval-batch-size", self.eval_batch_size)):
            if value < 1:
                raise CplError(f"{option} {value}: must be at least 1")
        if self.weight_decay < 0:
            raise CplError(f"--weight-decay {self.weight_decay}: must not be negative")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values."""
        return asdict(self)


class TrainingDiverged(CplError):
    """The loss became NaN or infinite; the run stops before applying that step."""


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that keeps moments only for the entries a mask lets change, and changes nothing else.

    For a partly frozen tensor the two moments are compact 1-D tensors over its collaborative
    entries (selected with the bool mask); frozen entries get no update at all, weight decay
    included. Tensors given without a mask train entirely, as in plain AdamW.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        frozen: Sequence[torch.Tensor | None],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(list(params), {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.frozen = list(frozen)  # aligned with the single parameter group, True = frozen entry

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One AdamW step on the collaborative entries of every parameter that has a gradient."""
        group = self.param_groups[0]
        for parameter, frozen in zip(group["params"], self.frozen, strict=True):
            if parameter.grad is None:
                continue
            keep = None if frozen is None else frozen.logical_not()  # bool, param shape
            grad = parameter.grad if keep is None else parameter.grad.masked_select(keep)  # (n_keep,)
            values = parameter if keep is None else parameter.masked_select(keep)  # (n_keep,) copy
            self._update(values, grad, self.state[parameter], group)
            if keep is not None:
                parameter.masked_scatter_(keep, values)

    @staticmethod
    def _update(values: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Decoupled-decay Adam update of ``values`` in place (``torch.optim.AdamW``'s arithmetic)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, step = group["lr"], state["step"]
        values.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        values.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def build_optimizer(
    config: TrainConfig, named: Sequence[tuple[str, torch.nn.Parameter]], frozen: dict[str, torch.Tensor]
) -> torch.optim.Optimizer:
    """The optimizer for the trainable parameters; AdamW becomes :class:`MaskedAdamW` under a mask.

    SGD and momentum get no weight decay of their own: the loop folds it into the gradients
    before the mask, so frozen entries never decay.
    """
    params = [parameter for _, parameter in named]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "momentum":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    if frozen:
        masks = [frozen.get(name) for name, _ in named]
        return MaskedAdamW(params, masks, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (momentum buffers, Adam moments)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class Trainer:
    """Runs epochs of one method with one optimizer on one model; checkpointable."""

    def __init__(self, model: torch.nn.Module, scorer: Scorer, method: Method, config: TrainConfig) -> None:
        config.check()
        self.scorer = scorer
        self.method = method
        self.config = config
        self.model = method.prepare(model)  # the module to train: the model itself or an adapter around it
        self.named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not self.named:
            raise CplError("nothing to train: the mask freezes every parameter entry")
        self.optimizer = build_optimizer(config, self.named, method.frozen_entries())

    @property
    def trainable_entries(self) -> int:
        """Entries that may change: collaborative entries under a mask, else all trainable ones."""
        frozen = self.method.frozen_entries()
        return sum(p.numel() - (int(frozen[n].sum()) if n in frozen else 0) for n, p in self.named)

    def train_epoch(self, questions: Sequence[Question], epoch: int) -> float:
        """One pass over the method's stream of ``questions``; returns the mean training loss.

        Raises:
            TrainingDiverged: when a step's loss is NaN or infinite (the step is not applied).
        """
        steps = batches(self.method.stream(questions, epoch, self.config.seed), self.config.batch_size)
        total = 0.0
        self.model.train()
        with progress_bar(f"train epoch {epoch}", len(steps), self.config.show_progress) as advance:
            for step, batch in enumerate(steps):
                self.method.before_step(self.model, step)
                total += self._step(batch, epoch, step)
                advance(1)
        self.model.eval()
        return total / len(steps)

    def _step(self, batch: Sequence[Question], epoch: int, step: int) -> float:
        loss = self.scorer.loss(self.model, batch).mean()
        penalty = self.method.penalty(self.model)
        if penalty is not None:
            loss = loss + penalty
        if not torch.isfinite(loss):
            self.model.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"epoch {epoch}, step {step + 1}: the loss is {loss.item()} (training diverged)")
        loss.backward()
        self._decay_gradients()
        self.method.mask_gradients(self.model)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)  # frees gradient memory before the next refresh or eval
        return loss.item()

    def _decay_gradients(self) -> None:
        """L2 weight decay for SGD and momentum, added before the mask so frozen entries never decay."""
        if self.config.weight_decay and self.config.optimizer != "adamw":
            for _, parameter in self.named:
                parameter.grad.add_(parameter.detach(), alpha=self.config.weight_decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every named parameter (tied weights once), detached: what a checkpoint stores."""
        return {name: parameter.detach() for name, parameter in self.model.named_parameters()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed weights back into the model."""
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                parameter.copy_(weights[name])
