"""Push and pull through the real huggingface_hub client, against a fake Hub on loopback."""

from __future__ import annotations

import json
import socket

import huggingface_hub
import pytest
import torch
from typer.testing import CliRunner

from cpl_masks import hub
from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.format import Mask
from cpl_masks.registry import Registry
from tests.fake_hub import TOKEN

REPO = "me/arc-mask"


@pytest.fixture
def mask_ref(tmp_path) -> str:
    """A registered mask profiled (so its provenance says) on the built-in SmolLM2 for task arc."""
    generator = torch.Generator().manual_seed(0)
    bits = {f"model.layers.{layer}.mlp.up_proj.weight": torch.rand(8, 4, generator=generator) > 0.4 for layer in (0, 1)}
    metadata = {
        "model": {"ref": "smollm2-135m-instruct", "fingerprint": "f" * 64},
        "task": "arc",
        "data": {"inject": {"sha256": "a" * 64, "rows": 4, "path": "allenai/ai2_arc"}},
    }
    return Registry().register(Mask.from_bool(bits, metadata).save(tmp_path / "arc.safetensors"))


def switch_registry(tmp_path, monkeypatch, name: str) -> None:
    """Continue as another machine: an empty registry and an empty Hub cache."""
    monkeypatch.setenv("CPL_MASKS_HOME", str(tmp_path / name))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / f"{name}-cache"))


def test_push_uploads_mask_card_provenance_and_figure_and_pull_registers_it(server, mask_ref, tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["push", mask_ref, "--repo-id", REPO])
    assert result.exit_code == 0, result.output
    repo = server.hub.repos[REPO]
    files = repo.commits[repo.branches["main"]]
    original = Registry().resolve(mask_ref)
    assert files["mask.safetensors"] == original.read_bytes()
    card = files["README.md"].decode()
    front = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "library_name: cpl-masks" in front
    assert "allenai/ai2_arc" in front and "cpl-masks pull me/arc-mask" in card
    mask_id = Mask.load(original).id
    assert json.loads(files["provenance.json"])["id"] == mask_id
    assert files["per_layer.png"].startswith(b"\x89PNG")
    [push] = Registry().show(mask_ref)["transfers"]
    assert (push["direction"], push["repo_id"], push["commit_sha"]) == ("push", REPO, repo.branches["main"])

    switch_registry(tmp_path, monkeypatch, "elsewhere")
    result = CliRunner().invoke(app, ["pull", REPO, "--name", "shared-arc"])
    assert result.exit_code == 0, result.output
    details = Registry().show("smollm2-135m-instruct/shared-arc@v1")
    assert details["id"] == mask_id and details["source"] == "profiled"  # what it is; where from is below
    assert (details["repo_id"], details["revision"]) == (REPO, repo.branches["main"])
    assert [item["direction"] for item in details["transfers"]] == ["pull"]
    assert Registry().resolve(mask_id[:8]).read_bytes() == original.read_bytes()


def test_push_to_a_branch_and_pull_that_revision(server, mask_ref, tmp_path, monkeypatch):
    pushed = hub.push(mask_ref, REPO, registry=Registry(), private=True, revision="dev")
    repo = server.hub.repos[REPO]
    assert repo.private and pushed.revision == "dev" and repo.branches["dev"] == pushed.commit_sha
    assert "mask.safetensors" not in repo.commits[repo.branches["main"]]
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    with pytest.raises(CplError, match=r"no mask\.safetensors"):
        hub.pull(REPO, registry=Registry())
    pulled = hub.pull(f"{REPO}@dev", registry=Registry())
    assert pulled.commit_sha == pushed.commit_sha and pulled.ref == "smollm2-135m-instruct/hub.me.arc-mask@v1"


def test_push_without_a_token_is_refused_before_any_upload(server, mask_ref, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = CliRunner().invoke(app, ["push", mask_ref, "--repo-id", REPO])
    assert result.exit_code == 2 and "no Hugging Face token" in result.output
    assert server.hub.repos == {}


def test_a_wrong_token_is_reported_as_rejected(server, mask_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(CplError, match=r"rejected your token \(401\)"):
        hub.push(mask_ref, REPO, registry=Registry())
    assert server.hub.repos == {}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.push(mask_ref, REPO, registry=Registry())
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    with pytest.raises(CplError, match=r"rejected your token \(401\)"):
        hub.pull(REPO, registry=Registry())
    assert Registry().list_masks() == []


def test_missing_repo_or_revision_registers_nothing(server, mask_ref, tmp_path, monkeypatch):
    hub.push(mask_ref, REPO, registry=Registry())
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    with pytest.raises(CplError, match="repository not found"):
        hub.pull("me/no-such-mask", registry=Registry())
    with pytest.raises(CplError, match="no such revision"):
        hub.pull(f"{REPO}@nope", registry=Registry())
    with pytest.raises(CplError, match="expected OWNER/NAME"):
        hub.pull("not a repo", registry=Registry())
    assert Registry().list_masks() == []


def test_an_unreachable_hub_is_a_network_error(mask_ref, monkeypatch):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["pull", REPO])
    assert result.exit_code == 2 and "cannot reach the Hub" in result.output
    with pytest.raises(CplError, match="cannot reach the Hub"):
        hub.push(mask_ref, REPO, registry=Registry())


def test_a_downloaded_file_whose_id_does_not_match_is_not_registered(server, mask_ref, tmp_path, monkeypatch):
    hub.push(mask_ref, REPO, registry=Registry())
    content = Registry().resolve(mask_ref).read_bytes()
    server.hub.tamper(REPO, "mask.safetensors", content[:-1] + bytes([content[-1] ^ 0x01]))
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    result = CliRunner().invoke(app, ["pull", REPO])
    assert result.exit_code == 2 and "content id mismatch" in result.output
    assert Registry().list_masks() == []


def test_a_provenance_that_names_another_mask_is_refused(server, mask_ref, tmp_path, monkeypatch):
    hub.push(mask_ref, REPO, registry=Registry())
    server.hub.tamper(REPO, "provenance.json", json.dumps({"id": "0" * 64}).encode())
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    with pytest.raises(CplError, match=r"provenance\.json says 0{12}"):
        hub.pull(REPO, registry=Registry())
    assert Registry().list_masks() == []


def test_pull_registers_into_the_registry_it_is_given(server, mask_ref, tmp_path, monkeypatch):
    hub.push(mask_ref, REPO, registry=Registry())
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    given = Registry(tmp_path / "given")
    pulled = hub.pull(REPO, registry=given)
    assert given.show(pulled.ref)["repo_id"] == REPO and Registry().list_masks() == []


def test_pushing_a_mask_registered_under_another_name_adds_no_name(server, tmp_path):
    bits = {"model.layers.0.mlp.up_proj.weight": torch.arange(32).reshape(8, 4) % 3 == 0}
    metadata = {"model": {"ref": "smollm2-135m-instruct", "fingerprint": "f" * 64}, "task": "arc"}
    mask = Mask.from_bool(bits, metadata)
    registry = Registry()
    renamed = registry.register(mask, task="renamed")
    pushed = hub.push(renamed, REPO, registry=registry)
    assert pushed.ref == renamed == "smollm2-135m-instruct/renamed@v1"
    assert registry.names(mask.id) == [renamed]  # no "arc" alias appeared


def tiny_base_mask(seed: int) -> Mask:
    """A mask whose metadata says model ``tiny``, task ``base``: what a stranger's repo may claim."""
    bits = {"model.layers.0.mlp.up_proj.weight": torch.rand(8, 4, generator=torch.Generator().manual_seed(seed)) > 0.5}
    return Mask.from_bool(bits, {"model": {"ref": "tiny", "fingerprint": "f" * 64}, "task": "base"})


def test_a_pull_never_becomes_a_version_of_a_local_name(server, tmp_path, monkeypatch):
    mine = Registry().register(tiny_base_mask(1))
    assert mine == "tiny/base@v1"
    switch_registry(tmp_path, monkeypatch, "stranger")
    Registry().register(tiny_base_mask(2))
    hub.push("tiny/base", "evil/shadow", registry=Registry())
    switch_registry(tmp_path, monkeypatch, "home")
    assert Registry().register(tiny_base_mask(1)) == "tiny/base@v1"
    result = CliRunner().invoke(app, ["pull", "evil/shadow"])
    assert result.exit_code == 0, result.output
    pulled = tiny_base_mask(2).id
    assert Registry().names(pulled) == ["tiny/hub.evil.shadow@v1"]
    assert Mask.load(Registry().resolve("tiny/base")).id == tiny_base_mask(1).id  # train --mask tiny/base: mine
    listing = CliRunner().invoke(app, ["registry", "list"])
    assert "pulled from evil/shadow" in listing.output
    asked = CliRunner().invoke(app, ["pull", "evil/shadow", "--name", "base"])  # the user asks: it joins the name
    assert asked.exit_code == 0, asked.output
    assert Mask.load(Registry().resolve("tiny/base")).id == pulled


def test_pulled_task_names_the_repo_within_the_length_limit():
    assert hub.pulled_task("me/arc-mask") == "hub.me.arc-mask"
    long = hub.pulled_task("owner/" + "x" * 96)
    assert len(long) == 64 and long.startswith("hub.owner.xxx")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "provenance.json is not a JSON object"),
        (b'{"id": 5}', "provenance.json 'id' is not a mask id"),
        (b"not json", "provenance.json is not valid JSON"),
        (b"[" * 5000, "provenance.json is not valid JSON"),
    ],
)
def test_a_malformed_provenance_is_a_one_line_error(server, mask_ref, tmp_path, monkeypatch, content, message):
    hub.push(mask_ref, REPO, registry=Registry())
    server.hub.tamper(REPO, "provenance.json", content)
    switch_registry(tmp_path, monkeypatch, "elsewhere")
    result = CliRunner().invoke(app, ["pull", REPO])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert Registry().list_masks() == []
