"""What a method holds in memory: no gradient for a wholly frozen tensor, no step temporary beyond a chunk."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cpl_masks import Mask, MethodContext, TrainConfig, make_method, make_scorer
from cpl_masks.masks.signs import PackedSigns
from cpl_masks.training.frozen import frozen_count, pack_frozen
from cpl_masks.training.loop import MaskedAdamW, TrainingLoop
from tests.conftest import make_questions
from tests.test_train import fresh


class NewStorages(TorchDispatchMode):
    """Records the size in bytes of every storage an op allocates (views of existing storages excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {arg.untyped_storage().data_ptr() for arg in _tensors(args, kwargs)}
        self.sizes += [
            t.untyped_storage().nbytes() for t in _tensors((out,), {}) if t.untyped_storage().data_ptr() not in known
        ]
        return out


def _tensors(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    flat = [*args, *(kwargs or {}).values()]
    found = []
    while flat:
        item = flat.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, list | tuple):
            flat.extend(item)
    return found


def test_masked_adamw_step_allocates_nothing_larger_than_a_chunk(monkeypatch):
    monkeypatch.setattr("cpl_masks.masks.bits.CHUNK_ENTRIES", 256)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32))  # 2,048 entries, 8 rows a chunk
    frozen = torch.rand(64, 32) < 0.4
    optimizer = MaskedAdamW([weight], [pack_frozen(frozen)], lr=0.01, weight_decay=0.1)
    kept_bytes = int((~frozen).sum()) * 4  # the tensor's kept entries as float32: ~4.9 KB
    for _ in range(2):  # the first step also makes the moments, which stay
        weight.grad = torch.randn(64, 32)
        with NewStorages() as recorded:
            optimizer.step()
    assert max(recorded.sizes) <= 256 * 8 < kept_bytes  # a chunk's kept positions (int64) at most
    assert optimizer.state[weight]["exp_avg"].numel() == int((~frozen).sum())  # moments: kept entries only


def test_a_wholly_frozen_tensor_never_gets_a_gradient(tiny_model_dir):
    loaded = fresh(tiny_model_dir)
    names = [name for name, _ in loaded.model.named_parameters()]
    wholly, partly = names[1], names[2]
    bits = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in loaded.model.named_parameters()}
    bits[wholly] = torch.zeros_like(bits[wholly])  # every entry frozen
    bits[partly] = torch.rand(bits[partly].shape, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = Mask.from_bool(bits, {"task": "memory"})
    scorer = make_scorer("letter", loaded.tokenizer)
    method = make_method("mask", MethodContext(scorer, [], mask))
    loop = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.01, optimizer="adamw", show_progress=False))
    parameters = dict(loaded.model.named_parameters())
    seen: list[bool] = []
    loop.optimizer.register_step_pre_hook(lambda *_: seen.append(parameters[wholly].grad is None))
    loop.train_epoch(make_questions(3, 5, "i"), 1)
    assert seen == [True] * 3 and not parameters[wholly].requires_grad
    assert wholly not in method.frozen_entries()  # nothing held for it either
    assert frozen_count(method.frozen_entries()[partly]) == int((~bits[partly]).sum())
    assert parameters[wholly] not in loop.optimizer.state


def test_the_per_step_rule_packs_and_drops_a_chunk_at_a_time(monkeypatch):
    torch.manual_seed(0)
    g_m, step = torch.randn(40, 30), torch.randn(40, 30)  # 1,200 entries
    whole = PackedSigns.take({"w": g_m.clone()})
    monkeypatch.setattr("cpl_masks.masks.bits.CHUNK_ENTRIES", 100)  # rounded up to whole bytes: 104 entries
    gradients = {"w": g_m.clone()}
    with NewStorages() as packing:
        chunked = PackedSigns.take(gradients)
    assert all(
        torch.equal(getattr(chunked, plane)["w"], getattr(whole, plane)["w"]) for plane in ("positive", "negative")
    )
    dropped = step.clone()
    with NewStorages() as dropping:
        chunked.drop_disagreeing_in("w", dropped)
    assert torch.equal(dropped, torch.where(step * g_m < 0, 0.0, step))
    assert max(packing.sizes + dropping.sizes) <= 104 * 4 < step.numel()  # bytes: never a whole tensor's bool


def test_only_trained_weights_get_float32_masters(tiny_model_dir):
    """bfloat16 weights: LoRA's frozen base and a mask's wholly frozen tensor stay bfloat16, 2 bytes each."""
    from cpl_masks import load_model

    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    scorer = make_scorer("letter", loaded.tokenizer)
    loop = TrainingLoop(loaded.model, scorer, make_method("lora", MethodContext(scorer, [])), TrainConfig(lr=0.01))
    dtypes = {name: p.dtype for name, p in loop.model.named_parameters()}
    assert {dtypes[name] for name in dtypes if "lora_" in name} == {torch.float32}
    assert {dtypes[name] for name in dtypes if "lora_" not in name} == {torch.bfloat16}
    loop.train_epoch(make_questions(2, 5, "i"), 1)

    loaded = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    bits = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in loaded.model.named_parameters()}
    wholly = next(iter(bits))
    bits[wholly] = torch.zeros_like(bits[wholly])
    method = make_method("mask", MethodContext(scorer, [], Mask.from_bool(bits, {"task": "dtype"})))
    loop = TrainingLoop(loaded.model, scorer, method, TrainConfig(lr=0.01, show_progress=False))
    dtypes = {name: p.dtype for name, p in loop.model.named_parameters()}
    assert dtypes.pop(wholly) == torch.bfloat16 and set(dtypes.values()) == {torch.float32}
