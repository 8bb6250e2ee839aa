"""The mask file format, its checks on load, and mask statistics, diff and algebra."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from cpl_masks.errors import CplError
from cpl_masks.masks.algebra import combine
from cpl_masks.masks.bits import pack_bits, unpack_bits
from cpl_masks.masks.format import Mask, content_id, read_header, scores_sha256
from cpl_masks.masks.stats import diff, layer_of, module_type, summarize
from cpl_masks.models import model_fingerprint
from tests.data.make_golden_mask import BITS, GOLDEN, METADATA, SCORES, golden_mask


def random_bits(shapes: dict[str, tuple[int, ...]], seed: int, share: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=generator) < share for name, shape in shapes.items()}


SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (3, 5),
    "model.layers.1.mlp.down_proj.weight": (7,),
    "model.embed_tokens.weight": (4, 4),
    "model.norm.weight": (9,),
}


def make_mask(seed: int = 0, scores: bool = False, **metadata) -> Mask:
    bits = random_bits(SHAPES, seed)
    values = {name: torch.randn(shape) for name, shape in SHAPES.items()} if scores else None
    return Mask.from_bool(bits, {"model": {"ref": "m", "fingerprint": "f"}, "parents": [], **metadata}, values)


def read_raw_header(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (13, 5), (3, 3, 3), (2, 1, 17)])
def test_packing_round_trips_odd_sizes(shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (bits.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), bits)


def test_bit_order_is_little_endian_within_a_byte():
    bits = torch.zeros(10, dtype=torch.bool)
    bits[0] = bits[9] = bits[3] = True
    assert pack_bits(bits).tolist() == [0b00001001, 0b00000010]


def test_golden_file_layout(tmp_path):
    mask = make_mask(scores=True, task="t")
    path = mask.save(tmp_path / "m.safetensors")
    length, raw = read_raw_header(path)
    assert set(raw["__metadata__"]) == {"cpl_mask"}
    header = json.loads(raw["__metadata__"]["cpl_mask"])
    assert set(header) == {"format", "version", "id", "shapes", "scores", "metadata"}
    assert (header["format"], header["version"], header["scores"]) == ("cpl-mask", "1.0", True)
    assert header["shapes"] == {name: list(shape) for name, shape in SHAPES.items()}
    assert header["metadata"]["counts"] == {
        "entries": mask.entries,
        "collaborative": mask.collaborative_count(),
    }
    data_bytes = 0
    for name, shape in SHAPES.items():
        count = int(torch.tensor(shape).prod())
        assert raw[name]["dtype"] == "U8" and raw[name]["shape"] == [(count + 7) // 8]
        assert raw[f"scores/{name}"]["dtype"] == "BF16" and raw[f"scores/{name}"]["shape"] == list(shape)
        data_bytes += (count + 7) // 8 + 2 * count
    assert path.stat().st_size == 8 + length + data_bytes
    start = 8 + length + raw[next(iter(SHAPES))]["data_offsets"][0]
    first = path.read_bytes()[start : start + raw[next(iter(SHAPES))]["shape"][0]]
    assert first == pack_bits(mask.collaborative(next(iter(SHAPES)))).numpy().tobytes()


GOLDEN_ID = "9993d4811efc7234a69ca87778bf82d14d7e7a74340c02e10d1bae8132879dd6"
GOLDEN_SCORES_SHA256 = "0955cb3c3d4e02160d5b67f5921844a80f7054e55c8d80b8df9508563a32db02"


def test_golden_file_reads_and_writes_as_committed(tmp_path):
    mask = Mask.load(GOLDEN)
    assert mask.id == GOLDEN_ID and mask.names == list(BITS)
    for name, values in BITS.items():
        assert mask.collaborative(name).int().tolist() == values, name
    for name, values in SCORES.items():
        expected = torch.tensor(values, dtype=torch.bfloat16).view(torch.int16)  # raw bits: the sign of 0 counts
        assert torch.equal(mask.scores[name].view(torch.int16), expected), name
    counts = {"entries": 18, "collaborative": 11}
    assert mask.metadata == {**METADATA, "scores_sha256": GOLDEN_SCORES_SHA256, "counts": counts}
    assert golden_mask().save(tmp_path / "again.safetensors").read_bytes() == GOLDEN.read_bytes()


def test_content_id_follows_the_documented_recipe_and_ignores_order():
    mask = make_mask()
    digest = hashlib.sha256()
    for name in sorted(SHAPES):
        digest.update(f"{name}|{','.join(map(str, SHAPES[name]))}\n".encode())
        digest.update(mask.packed[name].numpy().tobytes())
    assert mask.id == digest.hexdigest()
    reversed_names = list(reversed(mask.names))
    reordered = {name: mask.packed[name] for name in reversed_names}
    assert content_id(reordered, {name: SHAPES[name] for name in reversed_names}) == mask.id
    assert make_mask(seed=1).id != mask.id


def test_save_load_round_trip(tmp_path):
    mask = make_mask(scores=True, note="x")
    loaded = Mask.load(mask.save(tmp_path / "m.safetensors"))
    assert loaded.id == mask.id and loaded.names == mask.names and loaded.metadata == mask.metadata
    for name in SHAPES:
        assert torch.equal(loaded.collaborative(name), mask.collaborative(name))
        assert torch.equal(loaded.scores[name], mask.scores[name])
    assert Mask.load(tmp_path / "m.safetensors", scores=False).scores is None
    assert read_header(tmp_path / "m.safetensors")["id"] == mask.id


def test_shares_count_bits():
    mask = make_mask()
    total = sum(int(mask.collaborative(name).sum()) for name in SHAPES)
    assert mask.collaborative_count() == total
    assert mask.collaborative_share() == pytest.approx(
        total / sum(torch.tensor(s).prod().item() for s in SHAPES.values())
    )


def rewrite_header(path, target, change) -> None:
    """Save the same tensors as ``path`` with the header JSON changed by ``change(header)``."""
    from safetensors.torch import load_file

    header = read_header(path)
    change(header)
    save_file(load_file(str(path)), str(target), metadata={"cpl_mask": json.dumps(header)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update(format="other"), "unknown mask format 'other'"),
        (lambda h: h.update(version="4.0"), "version '4.0' is not supported"),
        (lambda h: h.update(id="0" * 64), "content id mismatch"),
        (lambda h: h.pop("shapes"), "lacks shapes"),
        (lambda h: h["shapes"].update({"extra.weight": [3]}), "lacks tensor extra.weight"),
        (lambda h: h["shapes"].update({"model.norm.weight": [20]}), "not 3 packed bytes"),
        (lambda h: h.update(shapes=[[3, 5], [7]]), "mask header 'shapes' is not an object of parameter name to shape"),
        (lambda h: h.update(shapes="3x5"), "mask header 'shapes' is not an object"),
        (lambda h: h["shapes"].update({"model.norm.weight": 9}), "shape of model.norm.weight is 9, not a list"),
        (lambda h: h["shapes"].update({"model.norm.weight": [-9]}), r"shape of model.norm.weight is \[-9\], not"),
        (lambda h: h["shapes"].update({"model.norm.weight": [4.5]}), r"shape of model.norm.weight is \[4.5\], not"),
        (lambda h: h["shapes"].update({"model.norm.weight": ["9"]}), "shape of model.norm.weight is \\['9'\\], not"),
        (lambda h: h.update(metadata=[]), "mask header 'metadata' is not an object"),
        (lambda h: h.update(id=5), "mask header 'id' is not a string"),
    ],
)
def test_bad_headers_are_one_line_errors(tmp_path, change, message):
    path = make_mask().save(tmp_path / "m.safetensors")
    rewrite_header(path, tmp_path / "bad.safetensors", change)
    with pytest.raises(CplError, match=message) as error:
        Mask.load(tmp_path / "bad.safetensors")
    assert str(error.value).startswith(str(tmp_path / "bad.safetensors")) and "\n" not in str(error.value)


def score_offset(path, name: str) -> int:
    """Where the stored scores of ``name`` start in the file."""
    length, raw = read_raw_header(path)
    return 8 + length + raw[f"scores/{name}"]["data_offsets"][0]


def test_stored_scores_are_hashed_and_a_flipped_byte_is_refused(tmp_path):
    mask = make_mask(scores=True)
    assert mask.metadata["scores_sha256"] == scores_sha256(mask.scores)
    path = mask.save(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[score_offset(path, "model.norm.weight") + 2] ^= 0x01
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(CplError, match="stored scores do not match their recorded sha256") as error:
        Mask.load(tmp_path / "flipped.safetensors")
    assert str(tmp_path / "flipped.safetensors") in str(error.value)
    assert Mask.load(tmp_path / "flipped.safetensors", scores=False).id == mask.id  # the bits are intact


def test_scores_hash_is_not_kept_when_the_scores_are_dropped(tmp_path):
    mask = make_mask(scores=True)
    without = Mask.from_bool({name: mask.collaborative(name) for name in mask.names}, mask.metadata)
    assert "scores_sha256" not in without.metadata
    partial = Mask.load(mask.save(tmp_path / "m.safetensors"), scores=False)
    assert "scores_sha256" not in read_header(partial.save(tmp_path / "bits.safetensors"))["metadata"]


def test_non_finite_scores_are_refused_even_without_a_hash(tmp_path):
    from safetensors.torch import load_file

    path = make_mask(scores=True).save(tmp_path / "m.safetensors")
    header = read_header(path)
    del header["metadata"]["scores_sha256"]  # a file from before the hash was recorded
    tensors = load_file(str(path))
    tensors["scores/model.norm.weight"][4] = float("nan")
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"cpl_mask": json.dumps(header)})
    assert Mask.load(tmp_path / "old.safetensors", scores=False).scores is None
    with pytest.raises(CplError, match="stored scores of model.norm.weight are not all finite") as error:
        Mask.load(tmp_path / "old.safetensors")
    assert str(error.value).startswith(str(tmp_path / "old.safetensors"))


def test_newer_minor_version_is_read(tmp_path):
    path = make_mask().save(tmp_path / "m.safetensors")
    rewrite_header(path, tmp_path / "newer.safetensors", lambda h: h.update(version="1.7"))
    assert Mask.load(tmp_path / "newer.safetensors").id == make_mask().id


def test_truncated_corrupted_and_foreign_files(tmp_path):
    data = make_mask().save(tmp_path / "m.safetensors").read_bytes()
    cases = {
        "truncated": data[:-3],
        "tiny": data[:5],
        "garbage": b"\xff" * 64,
        "bad-json": data[:8] + b"{" * (len(data) - 8),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CplError, match=r"safetensors|truncated") as error:
            Mask.load(tmp_path / name)
        assert "\n" not in str(error.value)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (tmp_path / "flipped").write_bytes(bytes(flipped))
    with pytest.raises(CplError, match="content id mismatch"):
        Mask.load(tmp_path / "flipped")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign"))
    with pytest.raises(CplError, match="not a cpl-masks mask file"):
        Mask.load(tmp_path / "foreign")
    with pytest.raises(CplError, match="no such mask file"):
        Mask.load(tmp_path / "missing")


def model_mask(model, fingerprint: str) -> Mask:
    bits = {name: torch.ones(parameter.shape, dtype=torch.bool) for name, parameter in model.named_parameters()}
    return Mask.from_bool(bits, {"model": {"ref": "tiny", "fingerprint": fingerprint}})


def test_check_model_accepts_its_model_and_refuses_other_weights(tiny):
    model_mask(tiny.model, model_fingerprint(tiny.model)).check_model(tiny.model)
    other = model_mask(tiny.model, "0" * 64)
    with pytest.raises(CplError, match=r"other weights.*--allow-other-weights"):
        other.check_model(tiny.model)
    other.check_model(tiny.model, allow_other_weights=True)


def test_check_model_accepts_the_same_checkpoint_in_bfloat16(tiny, tiny_model_dir):
    from cpl_masks.masks.format import weights_metadata
    from cpl_masks.models import load_model

    bits = {name: torch.ones(parameter.shape, dtype=torch.bool) for name, parameter in tiny.model.named_parameters()}
    mask = Mask.from_bool(bits, {"model": {"ref": "tiny", **weights_metadata(tiny.model)}})
    assert mask.metadata["model"]["dtype"] == "float32"
    half = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    mask.check_model(half.model)  # same checkpoint, other precision
    old = model_mask(tiny.model, model_fingerprint(tiny.model))  # a mask from before the bfloat16 fingerprint
    old.metadata["profile"] = {"dtype": "float32"}
    with pytest.raises(CplError) as error:
        old.check_model(half.model)
    assert "model tiny in float32; this model is in bfloat16" in str(error.value)
    other = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    with torch.no_grad():
        other.model.model.norm.weight.add_(1.0)
    with pytest.raises(CplError, match="other weights"):
        mask.check_model(other.model)


def test_check_model_lists_the_first_name_and_shape_mismatches(tiny):
    mask = model_mask(tiny.model, model_fingerprint(tiny.model))
    bits = {name: mask.collaborative(name) for name in mask.names}
    bits["model.norm.weight"] = torch.ones(3, dtype=torch.bool)
    bits["extra.weight"] = torch.ones(2, dtype=torch.bool)
    del bits["lm_head.weight"]
    with pytest.raises(CplError) as error:
        Mask.from_bool(bits, mask.metadata).check_model(tiny.model)
    message = str(error.value)
    assert "extra.weight missing from the model" in message
    assert "lm_head.weight not in the mask" in message
    assert "model.norm.weight is [64] in the model but [3] in the mask" in message


def test_module_types_and_layers():
    assert [module_type(name) for name in SHAPES] == ["q", "down", "embeddings", "norms"]
    assert module_type("model.layers.3.input_layernorm.weight") == "norms"
    assert module_type("lm_head.weight") == "lm_head"
    assert [layer_of(name) for name in SHAPES] == ["0", "1", "-", "-"]


def test_summary_groups_add_up():
    mask = make_mask()
    summary = summarize(mask)
    assert summary["overall"]["collaborative"] == mask.collaborative_count()
    assert sum(group["entries"] for group in summary["by_module"].values()) == mask.entries
    assert list(summary["by_layer"]) == ["0", "1", "-"]
    assert summary["overall"]["touched_share"] is None  # no per-tensor statistics


def test_diff_with_itself_is_total_agreement_and_with_the_complement_none():
    mask = make_mask()
    same = diff(mask, mask)
    assert same["overall"]["agreement"] == 1.0 and same["overall"]["jaccard"] == 1.0
    assert all(group["agreement"] == 1.0 for group in same["by_layer"].values())
    complement = Mask.from_bool({name: ~mask.collaborative(name) for name in mask.names}, mask.metadata)
    opposite = diff(mask, complement)
    assert opposite["overall"]["agreement"] == 0.0 and opposite["overall"]["jaccard"] == 0.0


def test_diff_counts_match_bool_arithmetic():
    first, second = make_mask(seed=2), make_mask(seed=3)
    a = torch.cat([first.collaborative(name).reshape(-1) for name in first.names])
    b = torch.cat([second.collaborative(name).reshape(-1) for name in first.names])
    result = diff(first, second)["overall"]
    assert result["agreement"] == pytest.approx((a == b).float().mean().item())
    assert result["jaccard"] == pytest.approx(((a & b).sum() / (a | b).sum()).item())


def test_diff_refuses_different_parameters():
    other = Mask.from_bool({"x": torch.ones(3, dtype=torch.bool)}, {})
    with pytest.raises(CplError, match="different parameters"):
        diff(make_mask(), other)


def single_entry_masks(values: list[bool]) -> list[Mask]:
    return [Mask.from_bool({"w": torch.tensor([value])}, {"model": {"fingerprint": "f"}}) for value in values]


@pytest.mark.parametrize(
    ("op", "table"),
    [
        ("and", {(0, 0): 0, (0, 1): 0, (1, 0): 0, (1, 1): 1}),
        ("or", {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 1}),
        ("majority", {(0, 0): 0, (0, 1): 0, (1, 0): 0, (1, 1): 1}),
    ],
)
def test_combine_truth_tables_for_two(op, table):
    for (a, b), expected in table.items():
        result = combine(single_entry_masks([bool(a), bool(b)]), op)
        assert result.collaborative("w").item() is bool(expected)


def test_combine_majority_of_three_and_parents():
    for values in [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]:
        masks = single_entry_masks([bool(v) for v in values])
        result = combine(masks, "majority")
        assert result.collaborative("w").item() is (sum(values) >= 2)
        assert result.metadata["parents"] == [mask.id for mask in masks]


def test_combine_refuses_bad_inputs():
    with pytest.raises(CplError, match="--op"):
        combine([make_mask(), make_mask(1)], "xor")
    with pytest.raises(CplError, match="at least two"):
        combine([make_mask()], "and")
    other_weights = Mask.from_bool(random_bits(SHAPES, 4), {"model": {"ref": "m", "fingerprint": "g"}})
    with pytest.raises(CplError, match="different weights"):
        combine([make_mask(), other_weights], "or")
