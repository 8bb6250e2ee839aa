"""``cpl-masks fits``: whether a training run fits the device, told before it starts."""

from __future__ import annotations

from typing import Annotated

import typer

from cpl_masks.cli.common import DeviceOption, DtypeOption, ModelOption, print_table, reports_errors, say
from cpl_masks.masks.format import Mask
from cpl_masks.models import DEFAULT_MODEL
from cpl_masks.registry import Registry
from cpl_masks.training.costs import plan

NOT_FITTING_EXIT = 1  # a prediction, not an error: scripts can branch on it


@reports_errors
def fits(
    method: Annotated[str, typer.Option(help="full, mask, dynamic or lora.")],
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    model: ModelOption = DEFAULT_MODEL,
    mask: Annotated[str | None, typer.Option(help="With --method mask: the freeze mask (its kept share).")] = None,
    share: Annotated[float | None, typer.Option(help="With --method mask: its kept share, without a mask.")] = None,
    lora_rank: Annotated[int, typer.Option(help="With --method lora: 8 or 16.")] = 8,
    parameters: Annotated[float | None, typer.Option(help="Parameters, instead of counting --model's.")] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
) -> None:
    """Predict a run's peak memory and say whether the device has it.

    The prediction adds the loaded weights to the method's measured peak above them (a line fitted at
    0.3B to 1.2B parameters, batch 1, short questions: BENCHMARKS.md). Exit status 1 when it does not fit.

    \b
    Example:
      cpl-masks fits --model meta-llama/Llama-3.1-8B --method mask \\
          --optimizer adamw --share 0.3 --device cuda
    """
    if mask is not None:
        share = Mask.load(Registry().resolve(mask), scores=False).collaborative_share()
    predicted = plan(
        model,
        method,
        optimizer,
        share=share,
        lora_rank=lora_rank,
        dtype=dtype,
        device=device,
        parameters=None if parameters is None else round(parameters),
    )
    gib = 2**30
    print_table(
        f"{predicted.variant} on {predicted.parameters / 1e9:.2f}B parameters ({dtype})",
        ["", "GiB"],
        [
            ("weights", predicted.weights_bytes / gib),
            ("method (peak above weights)", predicted.method_bytes / gib),
            ("predicted peak", predicted.peak_bytes / gib),
            (f"free on {predicted.device}", predicted.available_bytes / gib),
        ],
    )
    if predicted.fits:
        say(f"fits, with {(predicted.available_bytes - predicted.peak_bytes) / gib:.1f} GiB to spare")
        return
    say(f"does not fit: {(predicted.peak_bytes - predicted.available_bytes) / gib:.1f} GiB short")
    raise typer.Exit(NOT_FITTING_EXIT)
