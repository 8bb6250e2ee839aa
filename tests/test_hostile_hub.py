"""Hub repos, repo ids and mask metadata from strangers: nothing a repo or a header claims is trusted.

Fixed cases are the ones the issue found; the property-based ones (hypothesis) feed generated repo
ids (ours accept exactly what ``huggingface_hub`` accepts, with an owner), pulled names (no two
repos share one) and model-card fields (the card keeps its shape and no field becomes a link or HTML).
"""

from __future__ import annotations

import hashlib
import os
import re
import string

import pytest
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from cpl_masks import hub
from cpl_masks.cli.app import app
from cpl_masks.errors import CplError
from cpl_masks.masks.bits import pack_bits
from cpl_masks.masks.format import Mask
from cpl_masks.registry import Registry
from cpl_masks.registry.names import check_task
from tests.fake_hub import Repo

PROPERTY = settings(
    max_examples=int(os.environ.get("CPL_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ID_CHARS = string.ascii_letters + string.digits + "-_."
HOSTILE = [
    "|", "\n", "\r\n", "\u2028", "\t", "[x](https://e.vil)", "![i](https://e.vil/i.png)",
    "<img src=x onerror=alert(1)>", "<https://e.vil>", "https://e.vil/p", "www.e.vil", "me@e.vil", "`", "```",
    "~~~", "\\", "&lt;", "&#60;", "*", "_", "# ", "---", "<!--", "-->", "[ref]: https://e.vil", "\u202e",
    "\u200b", "\x00", "\x1b[31m", " ", "a", "é", "|---|",
]  # fmt: skip
hostile_text = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join))


def stranger_mask(seed: int, *, model: str = "tiny", task: str = "base") -> Mask:
    """A mask whose metadata claims model ``model`` and task ``task``: what a stranger's repo may hold."""
    bits = {"model.layers.0.mlp.up_proj.weight": torch.rand(8, 4, generator=torch.Generator().manual_seed(seed)) > 0.5}
    return Mask.from_bool(bits, {"model": {"ref": model, "fingerprint": "f" * 64}, "task": task})


def host(server, repo_id: str, mask: Mask, tmp_path) -> str:
    """Put ``mask`` on the fake Hub as ``repo_id`` (one commit on main); returns the commit sha."""
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    content = mask.save(tmp_path / f"hosted-{sha[:8]}.safetensors").read_bytes()
    server.hub.repos[repo_id] = Repo(
        private=False, branches={"main": sha}, commits={sha: {"mask.safetensors": content}}
    )
    return sha


def hf_accepts(repo_id: str) -> bool:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def no_network(*_: object, **__: object) -> None:
    raise AssertionError("the Hub was reached")


# --- defect 2: a local name that fails its check is an error, never a cue to ask the Hub ---------------------


@pytest.mark.parametrize("damage", ["changed", "missing"])
@pytest.mark.parametrize("suffix", ["", "@v1", "@v7", "@main"])
def test_from_ref_of_a_damaged_local_name_never_reaches_the_hub(server, tmp_path, monkeypatch, damage, suffix):
    mine = stranger_mask(1)
    assert Registry().register(mine) == "tiny/base@v1"
    host(server, "tiny/base", stranger_mask(2), tmp_path)  # a stranger's repo of that very name
    stored = Registry().resolve("tiny/base")
    if damage == "changed":
        stored.chmod(0o644)
        stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    else:
        stored.unlink()
    monkeypatch.setattr(hub, "hub_api", no_network)
    with pytest.raises(CplError) as refused:
        Mask.from_ref(f"tiny/base{suffix}")
    message = str(refused.value)
    assert "Hub" not in message and "\n" not in message
    assert [item["repo_id"] for item in Registry().list_masks()] == [None]  # nothing was pulled


def test_from_ref_still_pulls_a_repo_the_registry_does_not_know(server, tmp_path):
    Registry().register(stranger_mask(1))
    sha = host(server, "me/other", stranger_mask(2), tmp_path)
    assert Mask.from_ref("me/other").id == stranger_mask(2).id
    assert Mask.from_ref(f"hf://me/other@{sha}").id == stranger_mask(2).id


@pytest.mark.parametrize("ref", ["hf://a/b..c", "hf://a/b@", "hf://a/b@../../x", "hf://-a/b", "hf://a/b/c"])
def test_from_ref_refuses_an_invalid_hub_ref_before_any_network_call(server, monkeypatch, ref):
    monkeypatch.setattr(hub, "hub_api", no_network)
    with pytest.raises(CplError, match=r"not a valid Hub"):
        Mask.from_ref(ref)


# --- defect 5: the name a pull gets is injective in the repo id ---------------------------------------------


def test_pulls_of_a_b_dot_c_and_a_dot_b_c_get_different_names(server, tmp_path):
    host(server, "a/b.c", stranger_mask(1), tmp_path)
    host(server, "a.b/c", stranger_mask(2), tmp_path)
    first = hub.pull("a/b.c", registry=Registry()).ref
    second = hub.pull("a.b/c", registry=Registry()).ref
    assert first.split("@")[0] != second.split("@")[0] and first.endswith("@v1") and second.endswith("@v1")
    assert Registry().show(first)["repo_id"] == "a/b.c" and Registry().show(second)["repo_id"] == "a.b/c"


def test_a_pull_whose_default_name_holds_another_repos_mask_is_refused(server, tmp_path):
    Registry().register(stranger_mask(1, task="hub.me.arc"))  # a name made by hand, or by an older cpl-masks
    host(server, "me/arc", stranger_mask(2), tmp_path)
    with pytest.raises(CplError, match=r"tiny/hub\.me\.arc already holds .*--name"):
        hub.pull("me/arc", registry=Registry())
    assert len(Registry().list_masks()) == 1
    assert hub.pull("me/arc", registry=Registry(), task="arc-from-me").ref == "tiny/arc-from-me@v1"


def test_a_pulled_retain_set_and_a_pulled_mask_never_share_a_name(server, tmp_path):
    host(server, "me/x.retain", stranger_mask(1), tmp_path)
    assert hub.pull("me/x.retain", registry=Registry()).ref == "tiny/hub.me.x.retain@v1"
    retain = retain_set()
    content = retain.save(tmp_path / "retain.safetensors").read_bytes()
    server.hub.repos["me/x"] = Repo(False, {"main": "2" * 40}, {"2" * 40: {"mask.safetensors": content}})
    with pytest.raises(CplError, match=r"already holds"):
        hub.pull("me/x", registry=Registry())  # it would be filed as tiny/hub.me.x.retain


def valid_repo_ids() -> st.SearchStrategy[str]:
    part = st.text(alphabet=ID_CHARS, min_size=1, max_size=100)
    return st.builds(lambda owner, name: f"{owner}/{name}", part, part).filter(hf_accepts)


@PROPERTY
@given(first=valid_repo_ids(), second=valid_repo_ids())
def test_pulled_names_are_injective_and_valid_task_names(first, second):
    for repo_id in (first, second):
        assert check_task(hub.pulled_task(repo_id))
    assert (hub.pulled_task(first) == hub.pulled_task(second)) == (first == second)


@PROPERTY
@given(
    words=st.lists(st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=30), min_size=3),
    joins=st.lists(st.sampled_from(".-_"), min_size=8, max_size=8),
    data=st.data(),
)
def test_moving_the_slash_always_changes_the_pulled_name(words, joins, data):
    """``a/b.c`` vs ``a.b/c`` in general: the same characters, the owner boundary elsewhere."""
    words = words[:9]
    first, second = data.draw(st.lists(st.integers(0, len(words) - 2), min_size=2, max_size=2, unique=True))

    def repo(slash: int) -> str:
        return (
            "".join(word + ("/" if index == slash else joins[index]) for index, word in enumerate(words[:-1]))
            + (words[-1])
        )

    assume(hf_accepts(repo(first)) and hf_accepts(repo(second)))
    assert hub.pulled_task(repo(first)) != hub.pulled_task(repo(second))


# --- defect 6: every untrusted field reaches the model card escaped -----------------------------------------


def retain_set() -> Mask:
    """A small retain set (two sign planes) claiming model ``tiny`` and task ``x``."""
    generator = torch.Generator().manual_seed(3)
    positive = torch.rand(8, 4, generator=generator) > 0.5
    name = "model.layers.0.mlp.up_proj.weight"
    metadata = {"model": {"ref": "tiny", "fingerprint": "f" * 64}, "task": "x", "retain": {"objective": "answer"}}
    return Mask({name: pack_bits(positive)}, {name: (8, 4)}, metadata, negative={name: pack_bits(~positive)})


def hostile_metadata(fields: dict[str, str]) -> dict:
    return {
        "model": {"ref": fields["model"], "fingerprint": fields["fingerprint"]},
        "task": fields["task"],
        "scoring": fields["scoring"],
        "rule": {"threshold": 0.0, "freeze_pattern": fields["rule"]},
        "parents": [fields["parent"]],
        "created": fields["created"],
        "data": {fields["data_key"]: {"rows": 3, "sha256": fields["sha256"], "path": fields["path"]}},
    }


def card_parts(card: str) -> list:
    """The card's body (after the YAML front matter) as markdown-it tokens, GitHub tables on."""
    assert card.startswith("---\n")
    body = card.split("\n---\n", 1)[1]
    return MarkdownIt("commonmark").enable("table").parse(body)


def check_card(card: str, mask: Mask, name: str) -> None:
    """The table has one two-cell row per field, shows each field as plain text, and no field is a link or HTML."""
    tokens = card_parts(card)
    inline = [child for token in tokens for child in (token.children or [])]
    links = [child.attrs.get("href") for child in inline if child.type == "link_open"]
    images = [child.attrs.get("src") for child in inline if child.type == "image"]
    assert links == ["provenance.json"] and images == ([] if mask.kind == "retain" else ["per_layer.png"])
    assert not [token for token in tokens + inline if token.type in ("html_inline", "html_block")]
    assert [token.tag for token in tokens if token.type == "heading_open"] == ["h1", "h2", "h2"] + (
        [] if mask.kind == "retain" else ["h2"]
    )
    assert [token.type for token in tokens].count("fence") == 1 and [t.type for t in tokens].count("table_open") == 1
    start = next(i for i, token in enumerate(tokens) if token.type == "tbody_open")
    end = next(i for i, token in enumerate(tokens) if token.type == "tbody_close")
    cells = [token for token in tokens[start:end] if token.type == "inline"]
    rows = hub.card_rows(mask, name)
    assert [token.type for token in tokens[start:end]].count("tr_open") == len(rows)
    rendered = [(key.children[0].content if key.children else "", value) for key, value in zip(cells[::2], cells[1::2])]
    expected = [(hub.card_text(key), hub.card_text(value)) for key, value in rows]
    assert [(key, "".join(c.content for c in value.children)) for key, value in rendered] == expected
    lines = card.split("|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    for line in lines:  # every ASCII punctuation character of a field is escaped: no renderer makes it syntax
        assert re.findall(r"[!-/:-@\[-`{-~]", re.sub(r"\\[!-/:-@\[-`{-~]", "", line)) == ["|"] * 3, line


def test_a_pushed_card_with_hostile_metadata_keeps_its_table_and_has_no_foreign_link(server, tmp_path):
    fields = dict.fromkeys(
        ("model", "fingerprint", "task", "scoring", "rule", "parent", "created", "data_key", "sha256", "path"),
        "x | y\n| injected | row |\n[click](https://e.vil) <img src=x onerror=alert(1)> www.e.vil\n```\n# Owned",
    )
    mask = Mask.from_bool(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 4, dtype=torch.bool)}, hostile_metadata(fields)
    )
    path = mask.save(tmp_path / "hostile.safetensors")
    pushed = hub.push(str(path), "me/hostile", registry=Registry())
    repo = server.hub.repos["me/hostile"]
    card = repo.commits[repo.branches["main"]]["README.md"].decode()
    check_card(card, mask, pushed.ref)
    commands = card.split("```bash\n")[1].split("```")[0]
    assert "--model MODEL" in commands and not set(commands) & set("[]()<>|`'\"\\")


def test_a_retain_card_with_hostile_metadata_keeps_its_table():
    retain = retain_set()
    retain.metadata["task"] = "a|b\n|c|d|\n<script>x</script>[l](https://e.vil)"
    check_card(hub.model_card(retain, "tiny/x.retain@v1", "me/x"), retain, "tiny/x.retain@v1")


@PROPERTY
@given(
    fields=st.fixed_dictionaries(
        {
            key: hostile_text
            for key in ("model", "fingerprint", "task", "scoring", "rule", "parent", "created", "data_key", "sha256")
        }
        | {"path": hostile_text}
    ),
    name=st.one_of(st.just("tiny/arc@v1"), hostile_text),
)
def test_any_metadata_renders_as_plain_table_cells(fields, name):
    mask = Mask.from_bool(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 4, dtype=torch.bool)}, hostile_metadata(fields)
    )
    check_card(hub.model_card(mask, name, "me/arc"), mask, name)


@pytest.mark.parametrize("ref", ["[x](https://e.vil)", "e.vil/x y", "a/b\n---\nevil: 1", "a/b..c"])
def test_a_metadata_model_ref_reaches_the_front_matter_only_as_a_valid_repo_id(ref):
    mask = Mask.from_bool({"w": torch.ones(2, dtype=torch.bool)}, {"model": {"ref": ref}, "data": {"x": {"path": ref}}})
    front = hub.model_card(mask, "tiny/x@v1", "me/arc").split("\n---\n")[0]
    assert "base_model" not in front and "datasets" not in front


# --- defect 12: repo ids and revisions checked by huggingface_hub's own validator, before any network call ----


BAD_IDS = ["a/b..c", "a/..", "a/" + "x" * 197, "a/b--c", "a/b.git", "-a/b", "a/b-", "a/b/c", "a", "a/", "/b", "a/bé"]


@pytest.mark.parametrize("repo_id", BAD_IDS)
def test_cli_refuses_a_bad_repo_id_in_one_line_before_any_network_call(server, monkeypatch, repo_id):
    monkeypatch.setattr(hub, "hub_api", no_network)
    ref = Registry().register(stranger_mask(1))
    for args in (["pull", "--", repo_id], ["push", ref, "--repo-id", repo_id]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert "not a valid Hub repo id" in result.output
    assert server.hub.repos == {}


@pytest.mark.parametrize("revision", ["", "../../x", "a..b", "x y", "-x", "x.lock", "a//b", "/x", "x/", "@{1}", "x\n"])
def test_cli_refuses_a_bad_revision_before_any_network_call(server, monkeypatch, revision):
    monkeypatch.setattr(hub, "hub_api", no_network)
    ref = Registry().register(stranger_mask(1))
    for args in (["pull", "--", f"me/arc@{revision}"], ["push", ref, "--repo-id", "me/arc", "--revision", revision]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, (args, result.output)
        assert "not a valid Hub revision" in result.output


def test_a_pull_name_is_checked_before_any_network_call(server, monkeypatch):
    monkeypatch.setattr(hub, "hub_api", no_network)
    result = CliRunner().invoke(app, ["pull", "me/arc", "--name", "a/b"])
    assert result.exit_code == 2 and "--name" in result.output


def test_a_hub_that_answers_a_forged_commit_id_registers_nothing(server, tmp_path):
    sha = host(server, "me/arc", stranger_mask(1), tmp_path)
    repo = server.hub.repos["me/arc"]
    repo.commits["not-a-commit"], repo.branches["main"] = repo.commits[sha], "not-a-commit"
    with pytest.raises(CplError, match=r"commit id"):
        hub.pull("me/arc", registry=Registry())
    assert Registry().list_masks() == []


@PROPERTY
@given(
    repo_id=st.one_of(
        st.builds("{}/{}".format, st.text(alphabet=ID_CHARS, max_size=100), st.text(alphabet=ID_CHARS, max_size=100)),
        st.text(alphabet=ID_CHARS + "/ @é\n", max_size=60),
        st.text(max_size=30),
    )
)
def test_we_accept_a_repo_id_exactly_when_huggingface_hub_does(repo_id):
    assert hub.is_repo_id(repo_id) == (hf_accepts(repo_id) and repo_id.count("/") == 1)
    if hub.is_repo_id(repo_id):
        assert hub.check_repo_id(repo_id) == repo_id
        return
    with pytest.raises(CplError) as refused:
        hub.check_repo_id(repo_id, "--repo-id")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("--repo-id ")


@PROPERTY
@given(revision=st.text(alphabet=string.ascii_letters + "./-_@{}~^: \n", max_size=20))
def test_an_accepted_revision_cannot_leave_the_cache_or_break_a_url(revision):
    try:
        assert hub.check_revision(revision) == revision
    except CplError as error:
        assert "\n" not in str(error)
        return
    assert ".." not in revision and not revision.startswith(("/", "-")) and not set(revision) & set(" \n~^:{}")
    assert all(part and not part.startswith(".") for part in revision.split("/"))
