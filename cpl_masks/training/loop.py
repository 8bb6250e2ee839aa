"""The one training loop every method runs through, and the optimizers it steps.

A *method* (:mod:`cpl_masks.methods`) is a small strategy object the loop calls at fixed points, so
all methods share data order, loss, optimizer and evaluation and their comparison is fair.

Frozen entries stay bit-identical with every optimizer: SGD and momentum see zero gradients there
(so their momentum buffers stay zero) and weight decay is folded into the gradient *before* the
mask; with a static mask AdamW is :class:`MaskedAdamW`, which keeps its moments only for the
collaborative entries and writes nothing else.

Under ``torchrun`` (:mod:`cpl_masks.utils.distributed`) each step's batch is split across the ranks and
the model is wrapped in DDP (replicated weights, averaged gradients) or FSDP2 (``--distributed
fsdp2``: every parameter, gradient, freeze mask and optimizer moment is a per-rank shard); a step
then equals the single-process step on the whole batch.

Weights loaded in bfloat16 (``--dtype bfloat16``) train as float32 master weights with the forward
under bfloat16 autocast, so small updates are not rounded away; bfloat16 to float32 is exact, so
frozen entries keep their values, and the result is rounded back to bfloat16 once, when saved.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cpl_masks.data.questions import Question
from cpl_masks.errors import CplError
from cpl_masks.methods import METHODS, Method
from cpl_masks.scoring.scorers import Scorer, batches
from cpl_masks.training.frozen import as_rows, frozen_count, frozen_rows, row_chunks
from cpl_masks.utils import distributed, sharding
from cpl_masks.utils.progress import progress_bar

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
    distributed: str | None = None  # under torchrun: ddp (the default) or fsdp2; ignored in one process

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
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise CplError(f"--weight-decay {self.weight_decay}: must be a number of at least 0")
        if not 0 <= self.momentum < 1:
            raise CplError(f"--momentum {self.momentum}: must be in [0, 1)")
        if self.distributed not in (None, *sharding.WRAPPINGS):
            raise CplError(f"--distributed {self.distributed}: choose one of {', '.join(sharding.WRAPPINGS)}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values."""
        return asdict(self)


class TrainingDiverged(CplError):
    """The loss became NaN or infinite; the run stops before applying that step."""


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that keeps moments only for the entries a mask lets change, and changes nothing else.

    For a partly frozen tensor the two moments are compact 1-D tensors over its collaborative
    entries, in row-major order; frozen entries (packed bits, :mod:`cpl_masks.training.frozen`) get no
    update at all, weight decay included. Tensors given without a mask train entirely, as in plain
    AdamW. A step visits each tensor a chunk of rows at a time, so its temporaries (the chunk's kept
    entries, their gradients and the update's denominator) never outgrow a chunk, whatever the tensor.
    Under FSDP2 the parameter, its gradient and its packed rows are DTensor shards and the update runs
    on each rank's local rows, so each rank keeps moments only for its own collaborative entries.
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
        self.frozen = list(frozen)  # aligned with the single parameter group: packed rows, bit set = frozen

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One AdamW step on the collaborative entries of every parameter that has a gradient."""
        group = self.param_groups[0]
        for parameter, frozen in zip(group["params"], self.frozen, strict=True):
            if parameter.grad is None:
                continue
            weights = as_rows(sharding.local(parameter))  # (rows, cols) view of the local shard
            grads = as_rows(sharding.local(parameter.grad))
            packed = None if frozen is None else sharding.local(frozen)  # (rows, bytes) uint8
            state = self._state(parameter, weights, packed)
            state["step"] += 1
            offset = 0
            for start, stop in row_chunks(weights):
                offset += self._update_rows(weights[start:stop], grads[start:stop], packed, start, stop, offset, state)

    def _state(self, parameter: torch.Tensor, weights: torch.Tensor, packed: torch.Tensor | None) -> dict:
        """The parameter's moments (flat, over its kept entries), made at its first step."""
        state = self.state[parameter]
        if not state:
            kept = weights.numel() - (0 if packed is None else frozen_count(packed))
            state["step"] = 0
            state["exp_avg"] = weights.new_zeros(kept)
            state["exp_avg_sq"] = weights.new_zeros(kept)
        return state

    def _update_rows(
        self,
        weights: torch.Tensor,
        grads: torch.Tensor,
        packed: torch.Tensor | None,
        start: int,
        stop: int,
        offset: int,
        state: dict,
    ) -> int:
        """Update one chunk of rows in place; returns how many kept entries (moments) it used."""
        flat_weights, flat_grads = weights.view(-1), grads.reshape(-1)  # (n · cols,) views of the rows
        if packed is None:
            values, grad, kept = flat_weights, flat_grads, None  # the rows themselves
        else:
            keep = frozen_rows(packed, weights.shape[1], start, stop).logical_not_()  # (n, cols) bool
            kept = keep.view(-1).nonzero().squeeze(1)  # (kept,) int64: gathers beat masked_select 3x on a CPU
            values, grad = flat_weights.index_select(0, kept), flat_grads.index_select(0, kept)  # (kept,) copies
        moments = slice(offset, offset + values.numel())
        # flat views: a checkpoint from before moments were flat holds them in the parameter's shape
        exp_avg, exp_avg_sq = state["exp_avg"].view(-1)[moments], state["exp_avg_sq"].view(-1)[moments]
        self._update(values, grad, exp_avg, exp_avg_sq, state["step"], self.param_groups[0])
        if kept is not None:
            flat_weights.index_copy_(0, kept, values)
        return values.numel()

    @staticmethod
    def _update(
        values: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: int,
        group: dict,
    ) -> None:
        """Decoupled-decay Adam update of ``values`` in place (``torch.optim.AdamW``'s arithmetic)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        values.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        values.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


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
    """Bytes this process holds in the optimizer's state tensors (momentum buffers, Adam moments).

    Under FSDP2 that is this rank's shard only.
    """
    return sum(
        sharding.local(value).numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class TrainingLoop:
    """Runs epochs of one method with one optimizer on one model; checkpointable.

    ``model`` is the bare module: method hooks, evaluation and saving use it and its parameter
    names. ``network`` is what a step's forward runs through: ``model`` itself, or a DDP wrapper
    around it under torchrun (FSDP2 shards ``model`` in place, so there it is ``model``).
    """

    def __init__(self, model: torch.nn.Module, scorer: Scorer, method: Method, config: TrainConfig) -> None:
        config.check()
        self.scorer = scorer
        self.method = method
        self.config = config
        self.stored_dtype = _float32_masters(model)  # the dtype the weights came in
        self.model = method.prepare(model)  # the module to train: the model itself or an adapter around it
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise CplError("nothing to train: the mask freezes every parameter entry")
        frozen = method.frozen_entries()
        self._trainable = sum(p.numel() - (frozen_count(frozen[n]) if n in frozen else 0) for n, p in named)
        self.wrapping = sharding.wrapping_for(config.distributed)
        if self.wrapping != "fsdp2":  # FSDP2 shards a tensor group of one dtype
            _frozen_back_to(self.model, self.stored_dtype)
        shardable = [name for name, spec in METHODS.items() if spec.fsdp2]
        self.network = sharding.wrap_for_training(self.model, self.wrapping, method.name, shardable)
        if self.wrapping == "fsdp2":
            _shard_masks(self.model, method)
        self.named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]  # FSDP2's own
        self.optimizer = build_optimizer(config, self.named, method.frozen_entries())

    @property
    def trainable_entries(self) -> int:
        """Entries that may change: collaborative entries under a mask, else all trainable ones."""
        return self._trainable

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Forward passes in the dtype the weights were loaded in (bfloat16 autocast over float32 masters)."""
        if self.stored_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.stored_dtype)

    def train_epoch(self, questions: Sequence[Question], epoch: int) -> float:
        """One pass over the method's stream of ``questions``; returns the mean training loss.

        Raises:
            TrainingDiverged: when a step's loss is NaN or infinite (the step is not applied).
        """
        steps = batches(self.method.stream(questions, epoch, self.config.seed), self.config.batch_size)
        total = 0.0
        self.model.train()
        shown = self.config.show_progress and distributed.is_main()
        with progress_bar(f"train epoch {epoch}", len(steps), shown) as advance:
            for step, batch in enumerate(steps):
                self.method.before_step(self.model, epoch, step)
                total += self._step(batch, epoch, step)
                advance(1)
        self.model.eval()
        return total / len(steps)

    def _step(self, batch: Sequence[Question], epoch: int, step: int) -> float:
        loss, mean = self._loss(batch)
        penalty = self.method.penalty(self.model)
        if penalty is not None:
            loss, mean = loss + penalty, mean + penalty.detach()
        if not torch.isfinite(mean):  # the same value on every rank, so every rank stops here
            self.model.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"epoch {epoch}, step {step + 1}: the loss is {mean.item()} (training diverged)")
        loss.backward()
        self._decay_gradients()
        self.method.mask_gradients(self.model)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)  # frees gradient memory before the next refresh or eval
        return mean.item()

    def _loss(self, batch: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss this rank backpropagates, and the whole batch's mean answer loss (detached).

        In one process both are the batch mean. Under N ranks a rank's loss is the sum over its share
        of the batch times N / len(batch): DDP and FSDP2 average gradients over the ranks, so the step
        follows the gradient of the whole batch's mean. A rank whose share is empty (a batch smaller
        than N) runs one question at weight 0, so every rank joins the same collectives.
        """
        with self.autocast():
            if not distributed.active():
                loss = self.scorer.loss(self.network, batch).mean()
                return loss, loss.detach()
            share = distributed.shard(batch)
            losses = self.scorer.loss(self.network, share or batch[:1])  # (b,) this rank's answer losses
        partial = losses.detach().sum() if share else losses.new_zeros(())
        mean = distributed.all_reduce_sum(partial) / len(batch)
        return losses.sum() * (distributed.world_size() / len(batch) if share else 0.0), mean

    def _decay_gradients(self) -> None:
        """L2 weight decay for SGD and momentum, added before the mask so frozen entries never decay."""
        if self.config.weight_decay and self.config.optimizer != "adamw":
            for _, parameter in self.named:
                parameter.grad.add_(parameter.detach(), alpha=self.config.weight_decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every named parameter (tied weights once), detached: what a checkpoint stores.

        Under FSDP2 each parameter is gathered whole, one at a time (every rank must call this),
        and only rank 0 keeps them, on the CPU; the other ranks get an empty dict.
        """
        named = self.model.named_parameters()
        if self.wrapping != "fsdp2":
            return {name: parameter.detach() for name, parameter in named}
        keep = distributed.is_main()
        return {name: full.cpu() for name, full in sharding.full_tensors(named) if keep}

    def final_weights(self) -> dict[str, torch.Tensor] | None:
        """Ready the trained weights for saving, in the dtype they were loaded in (every rank calls it).

        Returns the gathered weights under FSDP2 (rank 0; empty elsewhere), else None: the model
        itself, cast back, is what the method saves. Call it once training is over.
        """
        if self.wrapping == "fsdp2":
            return {name: tensor.to(self.stored_dtype) for name, tensor in self.weights().items()}
        self.model.to(self.stored_dtype)
        return None

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed weights back into the model (under FSDP2, each rank its own shard)."""
        for name, parameter in self.model.named_parameters():
            sharding.copy_full_into(parameter, weights[name])


def _float32_masters(model: torch.nn.Module) -> torch.dtype:
    """The dtype the weights were loaded in; bfloat16 weights become float32 master weights (exactly)."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        model.float()
    return dtype


def _frozen_back_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the weights no step moves (LoRA's base, a mask's wholly frozen tensors) their loaded dtype back.

    Only trained weights need float32 masters; a frozen bfloat16 weight held in float32 would cost two
    bytes a parameter for nothing (its values are the same either way, and autocast computes in bfloat16).
    """
    if dtype == torch.float32:
        return
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def _shard_masks(model: torch.nn.Module, method: Method) -> None:
    """Under FSDP2, turn the method's freeze masks into DTensor shards placed like their parameters."""
    frozen = method.frozen_entries()
    sharding.shard_frozen_masks(model, frozen)
    if not all(sharding.is_dtensor(mask) for mask in method.frozen_entries().values()):
        raise CplError(f"--distributed fsdp2: --method {method.name} keeps freeze masks that cannot be sharded")
