"""LoRA (``lora``): train low-rank adapters beside frozen base weights, through ``peft``.

The base model's weights never change; each targeted linear layer ``W`` gains a trainable update
``(alpha / r)·B·A`` with ``A`` random and ``B`` zero at the start, so the wrapped model begins exactly
as the base. The result is the adapter alone (``adapter_config.json`` and its weights), which plain
``peft.PeftModel.from_pretrained(base, folder)`` loads onto the base model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpl_masks.errors import CplError
from cpl_masks.methods.base import Method, MethodContext, option

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer of the decoder, lm_head excluded


@dataclass
class LoraOptions:
    """LoRA's rank, scale, target modules and dropout (``--lora-*``)."""

    lora_rank: int = option(8, "adapter rank r")
    lora_alpha: int = option(16, "scale alpha; updates are (alpha/r)·BA")
    lora_targets: str = option(ALL_LINEAR, "all-linear or comma-separated module names, e.g. q_proj,v_proj")
    lora_dropout: float = option(0.0, "dropout on the adapter input")

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise CplError(f"--lora-rank {self.lora_rank}: must be at least 1")
        if not self.lora_alpha > 0:
            raise CplError(f"--lora-alpha {self.lora_alpha}: must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise CplError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if not target_modules(self.lora_targets):
            raise CplError(f"--lora-targets {self.lora_targets!r}: give all-linear or comma-separated module names")

    def target_modules(self) -> str | list[str]:
        """The ``target_modules`` peft takes: ``"all-linear"`` or a list of module names."""
        return target_modules(self.lora_targets)


def target_modules(targets: str) -> str | list[str]:
    """``"all-linear"`` as it is, else the comma-separated names as a list (empty names dropped)."""
    if targets.strip() == ALL_LINEAR:
        return ALL_LINEAR
    return [name.strip() for name in targets.split(",") if name.strip()]


class LoRA(Method):
    """Fine-tune low-rank adapters only; the base weights stay bit-identical."""

    name = "lora"

    def __init__(self, context: MethodContext, options: LoraOptions | None = None) -> None:
        self.seed = context.seed
        self.options = options or LoraOptions()
        self.counts: dict[str, int] = {}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap ``model`` in a peft LoRA model (seeded, so ``A``'s random init is reproducible); returns it."""
        from peft import LoraConfig, get_peft_model

        options = self.options
        config = LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            target_modules=options.target_modules(),
            lora_dropout=options.lora_dropout,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(self.seed)
        try:
            with warnings.catch_warnings():  # peft still asks transformers' deprecated spelling
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                wrapped = get_peft_model(model, config)
        except ValueError as error:  # peft's words for targets the model lacks
            raise CplError(f"--lora-targets {options.lora_targets}: {str(error).splitlines()[0]}") from None
        trainable, total = wrapped.get_nb_trainable_parameters()
        self.counts = {"trainable_parameters": int(trainable), "all_parameters": int(total)}
        return wrapped

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the adapter alone; ``peft.PeftModel.from_pretrained(base, folder)`` loads it."""
        model.save_pretrained(folder)

    def describe(self) -> dict[str, Any]:
        """Trainable (adapter) and all parameter counts of the wrapped model."""
        return dict(self.counts)
