"""Whether a training run fits, told before it starts: its peak memory predicted from measured lines.

``experiments/speed/method_costs.py`` measured, for every way to train, the peak resident memory above
the loaded model at 0.28B, 0.55B and 1.17B parameters (batch 1, questions of about 115 tokens; see
BENCHMARKS.md, "What each method costs") and fitted a line per method and weights dtype: bytes per
parameter times parameters, plus a constant (activations, the largest tensor's temporaries).
:func:`plan` adds that to the weights themselves and compares it with what the device has.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cpl_masks.errors import CplError
from cpl_masks.models import DTYPES, pretrained_folder, resolve_device


@dataclass(frozen=True)
class Line:
    """Peak memory above the loaded weights: ``bytes_per_parameter · parameters + constant_bytes``."""

    bytes_per_parameter: float
    constant_bytes: float

    def at(self, parameters: int) -> int:
        """The predicted bytes for a model of ``parameters``."""
        return max(0, math.ceil(self.bytes_per_parameter * parameters + self.constant_bytes))


# Fitted on 2026-12-07 by `method_costs.py --fit` on its records (experiments/results/method-costs), key
# (dtype, variant); BENCHMARKS.md shows the measurements.
# tests/test_costs.py checks that this table is what the records give.
MEASURED: dict[tuple[str, str], Line] = {
    ("bfloat16", "adamw-full"): Line(15.872, 2.394e08),
    ("bfloat16", "adamw-mask-0.25"): Line(10.123, -2.161e08),
    ("bfloat16", "adamw-mask-0.5"): Line(11.180, 1.489e08),
    ("bfloat16", "adamw-mask-0.75"): Line(13.323, 3.42e08),
    ("bfloat16", "sgd-full"): Line(7.372, -3.793e07),
    ("bfloat16", "sgd-mask-0.5"): Line(7.410, 4.472e07),
    ("bfloat16", "per-step"): Line(7.573, 1.75e07),
    ("bfloat16", "per-step-refresh"): Line(7.370, 1.873e08),
    ("bfloat16", "lora-r8"): Line(0.472, 2.141e08),
    ("bfloat16", "lora-r16"): Line(0.574, 2.037e08),
    ("float32", "adamw-full"): Line(12.762, 3.683e08),
    ("float32", "adamw-mask-0.25"): Line(6.519, 1.125e08),
    ("float32", "adamw-mask-0.5"): Line(8.848, 9.149e07),
    ("float32", "adamw-mask-0.75"): Line(11.063, 5.74e07),
    ("float32", "sgd-full"): Line(4.201, 7.014e07),
    ("float32", "sgd-mask-0.5"): Line(4.887, -1.11e08),
    ("float32", "per-step"): Line(4.649, 8.696e07),
    ("float32", "per-step-refresh"): Line(4.460, 4.16e08),
    ("float32", "lora-r8"): Line(0.632, 1.08e08),
    ("float32", "lora-r16"): Line(0.677, 1.62e08),
}

MASK_SHARES = (0.25, 0.5, 0.75)  # the kept shares masked AdamW was measured at


def variant(method: str, optimizer: str, *, share: float | None = None, lora_rank: int = 8) -> str:
    """The measured variant a run of ``method`` with ``optimizer`` costs like.

    Raises:
        CplError: a combination that was not measured (named, with the ones that were).
    """
    if method == "full" and optimizer in ("adamw", "sgd"):
        return f"{optimizer}-full"
    if method == "mask" and optimizer == "sgd":
        return "sgd-mask-0.5"  # a static mask's SGD cost hardly depends on its share
    if method == "mask" and optimizer == "adamw":
        if share is None:
            raise CplError("--method mask with adamw: give --mask MASK or --share S (its kept share)")
        return f"adamw-mask-{round(share, 3):g}"  # a profiled share, to three places
    if method == "dynamic" and optimizer == "sgd":
        return "per-step-refresh"  # the peak of a step with a refresh, the larger of the two
    if method == "lora" and lora_rank in (8, 16):
        return f"lora-r{lora_rank}"
    raise CplError(
        f"--method {method} with --optimizer {optimizer}: not measured; measured are full and mask (sgd, adamw), "
        "dynamic (sgd) and lora (rank 8 or 16)"
    )


def method_bytes(parameters: int, name: str, dtype: str, table: dict[tuple[str, str], Line] | None = None) -> int:
    """Predicted peak bytes above the loaded weights for the variant ``name`` (a masked AdamW share between
    two measured ones is interpolated)."""
    table = MEASURED if table is None else table
    if name.startswith("adamw-mask-"):
        share = float(name.removeprefix("adamw-mask-"))
        if not 0.0 < share <= 1.0:
            raise CplError(f"--share {share}: must be in (0, 1]")
        points = [(0.0, None), *((s, table[(dtype, f"adamw-mask-{s}")]) for s in MASK_SHARES)]
        points.append((1.0, table[(dtype, "adamw-full")]))
        for (low, low_line), (high, high_line) in itertools.pairwise(points):
            if low <= share <= high and low_line is not None:
                weight = (share - low) / (high - low)
                return math.ceil((1 - weight) * low_line.at(parameters) + weight * high_line.at(parameters))
        return table[(dtype, "adamw-mask-0.25")].at(parameters)  # below the smallest share measured
    if (dtype, name) not in table:
        raise CplError(f"{name} in {dtype}: not measured")
    return table[(dtype, name)].at(parameters)


def count_parameters(model: str) -> int:
    """Parameters of ``model`` (a model reference, or a ``config.json``), counted without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model if model.endswith(".json") else pretrained_folder(model)
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # a config transformers cannot read says why in many ways
        raise CplError(f"--model {model}: cannot read its config ({str(error).splitlines()[0][:200]})") from error
    return sum(parameter.numel() for parameter in built.parameters())


def device_memory(device: str) -> tuple[torch.device, int]:
    """The device a run would use, and the memory it has free now (CUDA: free; CPU: MemAvailable)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return resolved, torch.cuda.mem_get_info(resolved)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        lines = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        if "MemAvailable" in lines:
            return resolved, int(lines["MemAvailable"].split()[0]) * 1024
    return resolved, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class Plan:
    """A run's predicted memory against its device's."""

    parameters: int
    variant: str
    weights_bytes: int  # the loaded weights
    method_bytes: int  # the predicted peak above them
    device: str
    available_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Weights plus the method's peak."""
        return self.weights_bytes + self.method_bytes

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within what the device has free."""
        return self.peak_bytes <= self.available_bytes


def plan(
    model: str,
    method: str,
    optimizer: str,
    *,
    share: float | None = None,
    lora_rank: int = 8,
    dtype: str = "float32",
    device: str = "auto",
    parameters: int | None = None,
) -> Plan:
    """The predicted peak memory of training ``model`` with ``method`` and ``optimizer``, against the device's.

    ``parameters`` skips counting them from the model's config.
    """
    if dtype not in DTYPES:
        raise CplError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    name = variant(method, optimizer, share=share, lora_rank=lora_rank)
    count = parameters if parameters is not None else count_parameters(model)
    resolved, available = device_memory(device)
    weights = count * torch.finfo(DTYPES[dtype]).bits // 8
    return Plan(count, name, weights, method_bytes(count, name, dtype), str(resolved), available)
