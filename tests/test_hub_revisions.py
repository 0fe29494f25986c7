"""A hub model (--model Org/Name, --ref-model) is read at one commit, recorded in the run record, and a --resume reads
that commit again whatever the hub's main points to by then (README: run folders). Offline, on a fake hub cache in
tmp_path laid out as huggingface_hub lays out its own: models--org--tiny/refs/main holds a commit's sha,
snapshots/<sha>/ that commit's files (the tiny model, saved with save_pretrained)."""
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

import ares
from conftest import steps_logged

pytestmark = pytest.mark.usefixtures("one_thread")

FIRST, SECOND = (hashlib.sha1(text).hexdigest() for text in (b"first commit", b"second commit"))  # two commits' shas


def aepo_args(data, out, *extra) -> list[str]:  # a hub name is not `tiny`: the tiny model's sizes given as flags
    return ["--stage", "aepo", "--model", "org/tiny", "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--group-size", "4", "--max-response-len", "12", "--log-samples-every", "0", "--max-prompt-len", "256",
            "--minibatches", "1", "--micro-batch-size", "8", *map(str, extra)]


def coldstart_args(data, out, *extra) -> list[str]:
    return ["--stage", "coldstart", "--model", "org/tiny", "--data", str(data), "--out", str(out), "--steps", "1",
            "--batch-size", "4", "--micro-batch-size", "4", "--max-prompt-len", "256", "--max-response-len", "128",
            *map(str, extra)]


class Stop(Exception):
    """Ends a run where a test has seen what it needs."""


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value.code)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_ckpt) -> Path:
    """tiny_ckpt's folder with another model's weights (the same shapes): what a second commit to the repo holds."""
    folder = tmp_path_factory.mktemp("retrained")
    shutil.copytree(tiny_ckpt, folder, dirs_exist_ok=True)
    ares.build_tiny(seed=1)[0].save_pretrained(folder)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_ckpt) -> Path:
    """The fake cache, offline, holding org/tiny at FIRST (main) with tiny_ckpt's files -> the repository's folder."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for a subprocess; this one read it when huggingface_hub imported:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # it and transformers read this one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--org--tiny"
    publish(repo, FIRST, tiny_ckpt)
    return repo


def publish(repo: Path, commit: str, folder: Path):
    """A commit to the fake hub repository: its files in snapshots/<commit>/, and main pointing at it."""
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def embeddings(weights: dict) -> torch.Tensor:
    """The token embeddings among a model's weights (a state dict, or a safetensors file as loaded)."""
    (name,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    return weights[name].detach().float()


def loaded_models(monkeypatch) -> list:
    """Every model ares.load_model returns from here on, with the name it was given: [(name, model)]."""
    seen, load = [], ares.load_model

    def load_and_note(name, *args, **kw):
        model, processor = load(name, *args, **kw)
        seen.append((name, model))
        return model, processor

    monkeypatch.setattr(ares, "load_model", load_and_note)
    return seen


def started_at_first(hub: Path, demo_data, tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    """A cold start from org/tiny at FIRST, stopped once its policy has loaded (its run record written) -> (its --out,
    its arguments, for the resume)."""
    out = tmp_path / "run"
    args = coldstart_args(demo_data["sft"], out)
    with monkeypatch.context() as m, pytest.raises(Stop):
        stop_after_the_policy_loads(m)
        ares.main(args)
    return out, args


def copy_of_first(hub: Path, tmp_path: Path) -> Path:
    """A copy of FIRST's files, for a test to change into a second commit's."""
    second = tmp_path / "second"
    shutil.copytree(hub / "snapshots" / FIRST, second)
    return second


def stop_after_the_policy_loads(monkeypatch) -> list:
    """ares.load_model loads, is noted (loaded_models), then the run stops (Stop): a resume's checks have passed."""
    seen, load = [], ares.load_model

    def load_then_stop(name, *args, **kw):
        seen.append((name, load(name, *args, **kw)[0]))
        raise Stop

    monkeypatch.setattr(ares, "load_model", load_then_stop)
    return seen


def test_a_run_from_a_hub_model_records_the_commit_its_name_points_to(hub, demo_data, tmp_path, monkeypatch):
    """README (run folders): the run record holds the commit of each hub model it reads ("revision <sha>" in
    `contents`), --model's and --ref-model's, the one main pointed to when the run started."""
    publish(hub.with_name("models--org--ref"), SECOND, hub / "snapshots" / FIRST)
    out = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(Stop):
        stop_after_the_policy_loads(m)
        ares.main(aepo_args(demo_data["rl"], out, "--ref-model", "org/ref", "--steps", 1))
    contents = json.loads((out / "config.json").read_text())["contents"]
    assert (contents["model"], contents["ref_model"]) == (f"revision {FIRST}", f"revision {SECOND}")


def test_resume_reads_the_kl_reference_at_the_runs_commit_after_the_hubs_main_moved(hub, retrained, demo_data,
                                                                                    tmp_path, monkeypatch):
    """README (run folders): an AEPO run from a hub model, resumed from its checkpoint after a new commit with other
    weights reached the hub, takes its KL reference (the starting model) from the commit the run started from: its
    weights are the first snapshot's file, not the second's."""
    out = tmp_path / "run"
    args = aepo_args(demo_data["rl"], out)
    ares.main(args + ["--steps", 1])
    publish(hub, SECOND, retrained)
    seen = loaded_models(monkeypatch)
    ares.main(args + ["--steps", 2, "--resume"])
    assert steps_logged(out) == [1, 2]
    (reference,) = [model for name, model in seen if name == "org/tiny"]  # the policy comes from the checkpoint
    first, second = (embeddings(load_file(hub / "snapshots" / c / "model.safetensors")) for c in (FIRST, SECOND))
    assert not torch.equal(first, second)
    assert torch.equal(embeddings(reference.state_dict()), first)


def test_resume_before_the_first_checkpoint_starts_from_the_runs_commit_after_the_hubs_main_moved(
        hub, retrained, demo_data, tmp_path, monkeypatch):
    """README (run folders): a resume with no checkpoint yet starts the policy again from the hub model, at the commit
    the run started from, not at the one main points to now."""
    out = tmp_path / "run"
    args = coldstart_args(demo_data["sft"], out)
    with monkeypatch.context() as m, pytest.raises(Stop):  # stopped while the model loads: the run record alone
        stop_after_the_policy_loads(m)
        ares.main(args)
    publish(hub, SECOND, retrained)
    with monkeypatch.context() as m, pytest.raises(Stop):
        seen = stop_after_the_policy_loads(m)
        ares.main(args + ["--resume"])
    (name, policy), = seen
    assert name == "org/tiny"
    assert torch.equal(embeddings(policy.state_dict()), embeddings(load_file(hub / "snapshots" / FIRST /
                                                                             "model.safetensors")))


def test_resume_stops_with_one_line_when_the_runs_commit_cannot_be_had(hub, retrained, demo_data, tmp_path,
                                                                        monkeypatch):
    """README (run folders): offline, with the run's commit gone from the cache (main moved on, the old snapshot
    cleaned away), a resume stops before any model loads, with one line naming the flag, the name and the commit."""
    out, args = started_at_first(hub, demo_data, tmp_path, monkeypatch)
    publish(hub, SECOND, retrained)
    shutil.rmtree(hub / "snapshots" / FIRST)
    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
        m.setattr(ares, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
        ares.main(args + ["--resume"])
    assert one_line(e).startswith(f"--resume: --model org/tiny: the run started from its revision {FIRST} "
                                  f"({out / 'config.json'} holds it), which is not in the hub cache"), one_line(e)


def test_a_run_record_without_a_revision_resumes_at_mains_commit_and_holds_it_from_then_on(
        hub, retrained, demo_data, tmp_path, monkeypatch, capsys):
    """README (run folders): a run record written before revisions were recorded (a hub model compared by name) resumes
    as it did, reading the commit main points to now, says so in one line, and holds that commit from then on."""
    out, args = started_at_first(hub, demo_data, tmp_path, monkeypatch)
    record = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(record, contents=dict(record["contents"], model=None))))  # as
    publish(hub, SECOND, retrained)  # ares.py wrote it before revisions: a hub model had no fingerprint
    capsys.readouterr()
    with monkeypatch.context() as m, pytest.raises(Stop):
        seen = stop_after_the_policy_loads(m)
        ares.main(args + ["--resume"])
    assert (f"--resume: {out / 'config.json'} predates hub model revisions: --model org/tiny is read at the commit its "
            f"name points to now, {SECOND}") in capsys.readouterr().out
    (_, policy), = seen
    assert torch.equal(embeddings(policy.state_dict()), embeddings(load_file(hub / "snapshots" / SECOND /
                                                                             "model.safetensors")))
    assert json.loads((out / "config.json").read_text())["contents"]["model"] == f"revision {SECOND}"


def test_resume_of_a_run_from_a_local_folder_now_read_from_the_hub_names_the_hub_model(hub, demo_data, tmp_path,
                                                                                      monkeypatch):
    """--model org/tiny named a local folder ./org/tiny when the run started; by its resume the folder is gone and the
    same text names the hub model: the resume stops (nothing says the hub's commit holds the folder's weights), with
    one line that names the hub model and its commit (it called it 'a hub data set: its records')."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub / "snapshots" / FIRST, tmp_path / "org" / "tiny")
    out = tmp_path / "run"
    args = coldstart_args(demo_data["sft"], out, "--lr", 0.002, "--lr-schedule", "constant", "--warmup-steps", 20)
    with monkeypatch.context() as m, pytest.raises(Stop):  # (the flags the folder's ares_tiny set: the same again)
        stop_after_the_policy_loads(m)
        ares.main(args)
    assert json.loads((out / "config.json").read_text())["contents"]["model"] != f"revision {FIRST}"  # a folder's
    shutil.rmtree(tmp_path / "org")
    with pytest.raises(SystemExit) as e:
        ares.main(args + ["--resume"])
    assert one_line(e).startswith(f"--resume: --model org/tiny (a hub model, revision {FIRST}): other contents than "
                                  "when the run started"), one_line(e)


def test_resume_prompts_with_the_instruction_of_the_runs_commit_after_the_hubs_main_moved(hub, demo_data, tmp_path,
                                                                                           monkeypatch):
    """README (run folders, flags): the prompt suffix a run takes from its model (`ares_prompt_suffix` in config.json)
    is the one of the commit it reads: a new commit on the hub with another instruction neither stops the resume as a
    changed --prompt-suffix nor reaches its prompts."""
    out, args = started_at_first(hub, demo_data, tmp_path, monkeypatch)
    assert json.loads((out / "config.json").read_text())["flags"]["prompt_suffix"] == ""  # the tiny model's own
    second = copy_of_first(hub, tmp_path)
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps(dict(config, ares_prompt_suffix="Think step by step.")))
    publish(hub, SECOND, second)
    with monkeypatch.context() as m, pytest.raises(Stop):
        stop_after_the_policy_loads(m)
        ares.main(args + ["--resume"])
    assert json.loads((out / "config.json").read_text())["flags"]["prompt_suffix"] == ""


def test_a_lora_adapter_from_a_hub_model_names_the_commit_it_trained_from_after_a_resume_too(hub, retrained,
                                                                                              demo_data, tmp_path):
    """README (LoRA): adapter_config.json names the starting model, and for a hub model the commit the run read
    (`revision`, which peft's AutoPeftModel loads the base at), also in a checkpoint saved after a resume that followed
    a new commit on the hub: main's weights are not the ones the adapter was trained on."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    args = aepo_args(demo_data["rl"], out, "--lora-rank", 4)
    ares.main(args + ["--steps", 1])
    adapter = lambda: json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())  # noqa: E731
    assert (adapter()["base_model_name_or_path"], adapter()["revision"]) == ("org/tiny", FIRST)
    publish(hub, SECOND, retrained)
    ares.main(args + ["--steps", 2, "--resume"])
    assert steps_logged(out) == [1, 2]
    assert (adapter()["base_model_name_or_path"], adapter()["revision"]) == ("org/tiny", FIRST)


def test_a_hub_ref_model_is_the_kl_reference_at_its_own_commit_not_the_policys(hub, retrained, demo_data, tmp_path,
                                                                               monkeypatch):
    """--ref-model Org/Other is read at the commit of its own name (`contents["ref_model"]`), not at --model's: the
    reference's weights are the file in org/ref's snapshot, and --model's commit is not one of org/ref's."""
    ref_repo = hub.with_name("models--org--ref")
    publish(ref_repo, SECOND, retrained)
    out = tmp_path / "run"
    seen = loaded_models(monkeypatch)
    ares.main(aepo_args(demo_data["rl"], out, "--ref-model", "org/ref", "--steps", 1))
    (reference,) = [model for name, model in seen if name == "org/ref"]
    assert torch.equal(embeddings(reference.state_dict()),
                       embeddings(load_file(ref_repo / "snapshots" / SECOND / "model.safetensors")))


def test_a_prompt_suffix_given_by_the_user_is_kept_over_the_hub_models_own(hub, demo_data, tmp_path, monkeypatch):
    """--prompt-suffix given is the run's instruction; a hub model's `ares_prompt_suffix` (read at the run's commit)
    only fills it in where none is given."""
    config = json.loads((hub / "snapshots" / FIRST / "config.json").read_text())
    (hub / "snapshots" / FIRST / "config.json").write_text(json.dumps(dict(config, ares_prompt_suffix="Think.")))
    out = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(Stop):
        stop_after_the_policy_loads(m)
        ares.main(coldstart_args(demo_data["sft"], out, "--prompt-suffix", "Be brief."))
    assert json.loads((out / "config.json").read_text())["flags"]["prompt_suffix"] == "Be brief."


def test_resume_prompts_with_the_tokenizer_of_the_runs_commit_after_the_hubs_main_moved(hub, demo_data, tmp_path,
                                                                                          monkeypatch):
    """The tokenizer (its chat template: every prompt) is read at the run's commit too: a second commit on the hub
    with another chat template does not reach a resume's prompts."""
    out, args = started_at_first(hub, demo_data, tmp_path, monkeypatch)
    second = copy_of_first(hub, tmp_path)
    (second / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    publish(hub, SECOND, second)
    processors = []

    def note_then_stop(name, *a, processor=None, **kw):
        processors.append(processor)
        raise Stop

    with monkeypatch.context() as m, pytest.raises(Stop):
        m.setattr(ares, "load_model", note_then_stop)  # no checkpoint yet: the policy is --model's, with its processor
        ares.main(args + ["--resume"])
    first = (hub / "snapshots" / FIRST / "chat_template.jinja").read_text()
    assert processors[0].chat_template == first != (second / "chat_template.jinja").read_text()


def test_resume_of_a_run_whose_ref_model_was_a_local_folder_now_on_the_hub_names_the_hub_model(hub, demo_data,
                                                                                               tmp_path, monkeypatch):
    """As for --model: --ref-model org/ref named a local folder when the run started, and by the resume the same text
    names a hub model; the stop line calls it a hub model at its commit, not 'a hub data set: its records'."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub / "snapshots" / FIRST, tmp_path / "org" / "ref")
    out = tmp_path / "run"
    args = aepo_args(demo_data["rl"], out, "--ref-model", "org/ref", "--steps", 1)
    with monkeypatch.context() as m, pytest.raises(Stop):
        stop_after_the_policy_loads(m)
        ares.main(args)
    shutil.rmtree(tmp_path / "org")
    publish(hub.with_name("models--org--ref"), SECOND, hub / "snapshots" / FIRST)
    with pytest.raises(SystemExit) as e:
        ares.main(args + ["--resume"])
    assert one_line(e).startswith(f"--resume: --ref-model org/ref (a hub model, revision {SECOND}): other contents "
                                  "than when the run started"), one_line(e)


def test_resume_checks_the_model_family_of_the_runs_commit_not_mains(hub, demo_data, tmp_path, monkeypatch):
    """model_config (the family check, and an FSDP skeleton's shapes) reads config.json at the run's commit: a later
    commit to main of another family does not stop the run's resume, which still reads the first commit's model."""
    out, args = started_at_first(hub, demo_data, tmp_path, monkeypatch)
    second = copy_of_first(hub, tmp_path)
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps(dict(config, model_type="llava")))
    publish(hub, SECOND, second)
    with monkeypatch.context() as m, pytest.raises(Stop):
        seen = stop_after_the_policy_loads(m)
        ares.main(args + ["--resume"])
    assert [name for name, _ in seen] == ["org/tiny"]
