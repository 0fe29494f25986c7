"""Issue 13: what a researcher forking ares.py expects of a GRPO trainer: a run record checked on --resume, trackers,
a reward hook, refilled batches, validation during AEPO, LoRA, hub data through data_prep's presets, and the
prompt template in the run record. Each feature is tested without its optional package where it can be (a fake
writer, a hand-built state dict); the tests that need peft, tensorboard or wandb skip where they are not installed (requirements.txt pins peft and
tensorboard, so CI runs those; wandb is not in it)."""
import json
import math
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import ares
import data_prep
from conftest import ROOT, Killed, run_script, run_until_first_step_save

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = '''
calls = []


def score(record, response):
    """Mixed groups only for records whose id ends in 0, 3 or 6: every other response of theirs scores 1."""
    calls.append((record["id"], response))
    if int(record["id"][-1]) % 3:
        return 0.0
    return float(len(calls) % 2)
'''


def aepo_args(data, out, model, *extra) -> list[str]:
    return ["--stage", "aepo", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--group-size", "4", "--max-response-len", "12", "--log-samples-every", "0", *map(str, extra)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# 1. Run record, 8. prompt template


def test_run_record_holds_every_resolved_flag_versions_and_the_prompt_suffix(tmp_path, full_size_model):
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--stage", "aepo", "--model", full_size_model, "--data", "x",
                                                         "--out", str(tmp_path), "--lr", "3e-6"]), "aepo")
    record = ares.check_run_record(cfg, ares.RESUMABLE)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["flags"]["lr"] == 3e-6 and saved["flags"]["batch_size"] == 512  # given, and the stage default
    assert saved["flags"]["prompt_suffix"].startswith("You FIRST think about the reasoning process")  # README: paper settings
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["python"] == sys.version.split()[0]
    assert saved["git_commit"] is None or len(saved["git_commit"]) == 40
    tiny = ares.resolve_stage_defaults(ares.Config(model="tiny", data="x"), "aepo")
    assert tiny.prompt_suffix == ""  # the tiny model learns without the instruction (README)
    own = ares.resolve_stage_defaults(ares.Config(model="tiny", data="x", prompt_suffix="Answer in \\boxed{}."), "aepo")
    assert own.prompt_suffix == "Answer in \\boxed{}."


def test_resume_stops_on_changed_flags_and_lists_them_but_lets_steps_change(tmp_path):
    def cfg(*flags):
        return ares.resolve_stage_defaults(ares.parse_config(["--stage", "aepo", "--model", "tiny", "--data", "x",
                                                              "--out", str(tmp_path), *flags]), "aepo")

    ares.check_run_record(cfg("--lr", "1e-4", "--steps", "5"), ares.RESUMABLE)
    ares.check_run_record(cfg("--lr", "1e-4", "--steps", "9", "--save-every", "3", "--resume"), ares.RESUMABLE)  # may change
    assert json.loads((tmp_path / "config.json").read_text())["flags"]["steps"] == 9
    with pytest.raises(SystemExit) as e:
        ares.check_run_record(cfg("--lr", "2e-4", "--window", "3", "--steps", "9", "--resume"), ares.RESUMABLE)
    msg = str(e.value)
    assert "--lr 0.0002 (was 0.0001)" in msg and "--window 3 (was 1)" in msg and "--steps" in msg.split("Only")[1]
    assert "\n" not in msg
    # --lora-targets names a set of layers: another order or spacing is the same run, another layer is not
    ares.check_run_record(cfg("--lr", "1e-4", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj"), ares.RESUMABLE)
    ares.check_run_record(cfg("--lr", "1e-4", "--lora-rank", "4", "--lora-targets", "v_proj, q_proj", "--resume"),
                          ares.RESUMABLE)
    with pytest.raises(SystemExit) as e:
        ares.check_run_record(cfg("--lr", "1e-4", "--lora-rank", "4", "--lora-targets", "q_proj,k_proj", "--resume"),
                              ares.RESUMABLE)
    assert "--lora-targets 'q_proj,k_proj' (was 'v_proj, q_proj')" in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# 2. Trackers


class FakeWriter:
    """Records add_scalar calls as TensorBoard's SummaryWriter would receive them."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.calls, self.closed, self.purge_step = log_dir, [], False, purge_step
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def flush(self):  # open_tracker flushes each step
        pass

    def close(self):
        self.closed = True


def test_trackers_get_exactly_the_numbers_of_the_metrics_rows(tmp_path, monkeypatch):
    rows = [dict(step=1, loss=0.5, skipped=False, mfu=None, skipped_reason="x", n_easy=3),
            dict(step=2, loss=0.25, skipped=True, mfu=None, n_easy=0)]
    expected = [(k, float(v), r["step"]) for r in rows for k, v in r.items()
                if k != "step" and v is not None and not isinstance(v, str)]  # by hand: numbers and bools only
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logged = []
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    fake_wandb = types.SimpleNamespace(init=lambda **kw: logged.append(kw) or types.SimpleNamespace(
        log=lambda row, step: logged.append((row, step)), finish=lambda: logged.append("finished")))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    for kind in ("tensorboard", "wandb"):
        out = tmp_path / kind
        out.mkdir()
        metrics = ares.Metrics(out, 2, 0, kind, tracker=ares.open_tracker(ares.Config(report_to=kind), out,
                                                                                {"flags": {}}))
        for r in rows:
            metrics.log(r, ())
        metrics.close()
        assert read_jsonl(out / "metrics.jsonl") == rows
    tb = FakeWriter.made[-1]
    assert tb.calls == expected and tb.closed and tb.log_dir == str(tmp_path / "tensorboard" / "tensorboard")
    assert logged[0]["config"] == {"flags": {}} and logged[0]["dir"] == str(tmp_path / "wandb")
    assert logged[0]["project"] == "ares"  # $WANDB_PROJECT unset (below); README: the project
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    ares.open_tracker(ares.Config(report_to="wandb"), tmp_path / "wandb", {}).close()
    assert logged[-2]["project"] == "mine" and logged[-1] == "finished"
    assert [(k, v, s) for row, s in logged[1:3] for k, v in row.items()] == expected and logged[3] == "finished"
    assert ares.open_tracker(ares.Config(report_to="none"), tmp_path, {}) is None


def test_a_training_run_gives_wandb_its_run_record_as_config(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """README: W&B gets the run record as its config. The record comes back from check_run_record, which only rank 0
    runs (rank0_decides hands rank 0 its result): a cold start's wandb.init gets <out>/config.json as written."""
    import importlib.machinery

    inits = []
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importable, for the check before the run
    fake_wandb.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda row, step: None,
                                                                             finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    out = tmp_path / "run"
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out", str(out),
               "--steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--report-to", "wandb"])
    (init,) = inits
    assert json.loads(json.dumps(init["config"], default=str)) == json.loads((out / "config.json").read_text())
    assert init["config"]["flags"]["report_to"] == "wandb"


def test_a_missing_tracker_or_peft_package_is_one_line_before_anything_loads(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "peft") else real(name, *a))
    for flags, words in ((["--report-to", "wandb"], "--report-to wandb needs the optional package wandb"),
                         (["--lora-rank", "4"], "--lora-rank needs the optional package peft")):
        with pytest.raises(SystemExit, match=words):
            ares.parse_config(["--stage", "aepo", "--data", "x", "--out", str(tmp_path), *flags])


def test_a_run_without_lora_or_a_tracker_imports_neither_package(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """README (flags): peft is imported only with --lora-rank, tensorboard and wandb only with --report-to. With each
    made unimportable (None in sys.modules: `import` raises ImportError), ares.py imports in a fresh process, and a
    cold start and an AEPO step run."""
    names = ["peft", "tensorboard", "torch.utils.tensorboard", "wandb"]
    run_script(["-c", f"import sys; sys.modules.update(dict.fromkeys({names})); import ares"])
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out",
               str(tmp_path / "cold"), "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2"])
    ares.main(aepo_args(demo_data["rl"], tmp_path / "aepo", tiny_ckpt, "--steps", 1, "--keep-uniform-groups"))
    assert [r["step"] for r in read_jsonl(tmp_path / "aepo" / "metrics.jsonl")] == [1]


def test_a_tracker_added_as_the_readme_says_passes_the_flag_checks(tmp_path):
    """README (forking: a tracker): a fork adds a --report-to choice and its open_tracker branch. The check before
    anything loads looks for tensorboard's and wandb's packages only; it looked for a package named after any choice,
    so the recipe's `--report-to stdout` (a tracker that prints) stopped with 'needs the optional package stdout'."""
    cfg = ares.Config(stage="aepo", data="x", out=str(tmp_path), report_to="stdout")  # the choice the fork added
    assert ares.validate_extras(cfg) is cfg


def test_tensorboard_event_files_hold_the_metrics_rows(tmp_path, monkeypatch):
    """Each step's events are on disk once the step is logged, before the writer closes, as metrics.jsonl's row is: a
    run that dies (killed, never closing its writer) keeps every step it logged. The writer's thread writes them when
    it gets to them (here a slow disk: 0.2 s a record), and the run had gone on, or died, by then."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: time.sleep(0.2) or write(self, data))

    def shown():
        return [(e.step, e.value) for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("loss")]

    metrics = ares.Metrics(tmp_path, 2, 0, "x",
                                tracker=ares.open_tracker(ares.Config(report_to="tensorboard"), tmp_path, {}))
    for step, loss in ((1, 0.5), (2, 0.25)):
        metrics.log(dict(step=step, loss=loss), ())
        assert shown()[-1] == (step, loss)  # not yet closed
    metrics.close()
    assert shown() == [(1, 0.5), (2, 0.25)]


def test_tensorboard_shows_each_step_once_after_a_resume_and_none_of_the_old_run_after_overwrite(tmp_path, capsys):
    """A resume re-runs the steps after its checkpoint, and metrics.jsonl drops their old rows; TensorBoard's event
    files kept them, so a resumed run showed two values at one step, and --overwrite left the old run's events under
    the new run's. Now a resumed writer purges the steps it runs again and --overwrite deletes <out>/tensorboard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(start, losses):  # Metrics and its tracker as train_aepo makes them, resumed at step `start`
        metrics = ares.Metrics(tmp_path, 3, start, "x", tracker=ares.open_tracker(ares.Config(report_to="tensorboard"),
                                                                                  tmp_path, {}, start))
        for step, loss in losses:
            metrics.log(dict(step=step, loss=loss), ())
        metrics.close()
        return [(e.step, e.value) for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("loss")]

    assert run(0, [(1, 0.5), (2, 0.25), (3, 0.125)]) == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert run(1, [(2, 0.75), (3, 0.375)]) == [(1, 0.5), (2, 0.75), (3, 0.375)]  # resumed from step 1's checkpoint
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    ares.clear_old_run(ares.Config(stage="aepo", out=str(tmp_path), overwrite=True))
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert "(metrics.jsonl (3 steps), tensorboard/)" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["coldstart", "aepo"])
def test_a_run_killed_and_resumed_shows_tensorboard_each_step_once_with_the_rows_of_metrics_jsonl(
        stage, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """README "What is logged": a resumed run hides TensorBoard's events of the steps it runs again, as metrics.jsonl
    drops their rows. Through ares.main: a run killed while it saves step 2's checkpoint (step 2 already logged)
    resumes from step 1's and runs step 2 again; each step then shows once, with the value metrics.jsonl holds. And
    --overwrite deletes <out>/tensorboard with the old run: a new 1-step run shows its one step alone."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = (["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out", str(out),
             "--batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-3"] if stage == "coldstart" else
            aepo_args(demo_data["rl"], out, tiny_ckpt, "--keep-uniform-groups", "--lr", "1e-2"))
    args += ["--steps", "3", "--save-every", "1", "--report-to", "tensorboard"]
    save = ares.save_checkpoint

    def killed_saving_step_2(path, name, *a, **kw):
        if name == "step_000002":
            raise Killed(name)
        return save(path, name, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ares, "save_checkpoint", killed_saving_step_2)
        with pytest.raises(Killed):
            ares.main(args)
    before = {e.step: e.value for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("lr")}
    assert sorted(before) == [1, 2]
    ares.main(args + ["--resume"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    key = "loss" if stage == "coldstart" else "reward"
    shown = [(e.step, e.value) for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars(key)]
    assert shown == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    old = set((out / "tensorboard").iterdir())
    assert len(old) == 2  # an event file per writer: the killed run's and the resumed run's
    ares.main(args[:-6] + ["--steps", "1", "--report-to", "tensorboard", "--overwrite"])  # and none of the old run
    assert not old & set((out / "tensorboard").iterdir())
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert [(e.step, e.value) for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars(key)] == [
        (1, pytest.approx(row[key], rel=1e-6))]


def test_wandb_offline_writes_the_run_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = ares.open_tracker(ares.Config(report_to="wandb"), tmp_path, {"flags": {"lr": 0.125}})
    for step, loss in ((1, 0.5), (2, 0.375)):
        tracker.log(dict(step=step, loss=loss, skipped_reason="text is not sent"))
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    for _ in range(60):  # wandb-core flushes the file a moment after finish() returns
        data = runs[0].read_bytes()  # protobuf records: the keys and JSON values appear as text
        if b"0.375" in data:
            break
        time.sleep(0.5)
    assert b"loss" in data and b"0.375" in data and b"0.125" in data and b"text is not sent" not in data


# ----------------------------------------------------------------------------------------------------------
# 3. Reward hook, 4. dynamic sampling with refill


def test_buckets_of_fractional_scores_follow_the_group_mean_by_hand():
    scores = torch.tensor([0.5] * 4 + [0.9] * 4 + [0.2] * 4 + [1.0, 1.0, 0.0, 0.0])  # p = 0.5, 0.9, 0.2, 0.5
    assert ares.difficulty_buckets(scores, 4)[::4].tolist() == [1, 0, 2, 1]  # medium, easy, hard, medium (App. G)


def test_group_filters_by_hand():
    """G = 4, four groups: all right with penalties averaging 0.05; all right with one 0.02 penalty (mean 0.995);
    all wrong with exploration bonuses (mean 0.12); 2 of 4 right. Accuracy keeps only the mixed one; the paper's
    reward rule keeps a group whose mean shaped reward is in [0.01, 0.99]."""
    acc = torch.tensor([1.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1, 1, 0, 0])
    rewards = torch.tensor([1.0, 0.9, 0.9, 1.0] + [1.0, 1.0, 1.0, 0.98] + [0.12] * 4 + [1.0, 1.0, 0.12, 0.12],
                           dtype=torch.float64)
    assert ares.informative_groups(acc, rewards, 4, "accuracy").tolist() == [False, False, False, True]
    assert ares.informative_groups(acc, rewards, 4, "reward").tolist() == [True, False, True, True]
    assert ares.informative_groups(acc, acc.double(), 4, "reward").tolist() == [False, False, False, True]  # R = acc


def test_the_two_group_filters_agree_for_0_1_rewards_while_g_is_at_most_100():
    """README (choices, online filtering): for GRPO's R = acc with 0/1 scores the accuracy rule and the paper's reward
    rule ([0.01, 0.99], both ends in) keep the same groups while G <= 100; at G = 101 one right answer (or one wrong)
    averages 1/101 from the end and only the accuracy rule keeps it. Every count of right answers, G = 2..101."""
    for G in range(2, 102):
        acc = torch.tensor([float(k < c) for c in range(G + 1) for k in range(G)])  # group c: c of G right
        by_accuracy = ares.informative_groups(acc, acc, G, "accuracy").tolist()
        assert by_accuracy == [0 < c < G for c in range(G + 1)]
        by_reward = ares.informative_groups(acc, acc, G, "reward").tolist()
        differ = [c for c, (a, r) in enumerate(zip(by_accuracy, by_reward)) if a != r]
        assert differ == ([] if G <= 100 else [1, G - 1]), G


def test_keep_first_keeps_the_first_n_kept_groups_by_hand():
    """One rank: the first n kept groups in the order they were drawn, round 0's then each refill round's."""
    keep = torch.tensor([False, True, True, False, True])
    assert ares.keep_first(keep, 2).tolist() == [False, True, True, False, False]
    assert ares.keep_first(keep, 5).tolist() == keep.tolist()
    assert ares.keep_first(keep, 0).tolist() == [False] * 5
    keep = torch.tensor([True, False, True, True, True, False])  # 3 rounds of 2 groups
    assert ares.keep_first(keep, 3, rounds=3).tolist() == [True, False, True, True, False, False]


def test_drawn_position_is_where_a_round_robin_deal_put_each_group():
    """Each round's list of one rank (W * per_round groups, numbered in drawn order) dealt to W ranks as draw and
    step_indices deal it, list[rank::W]: a rank's groups, round by round, are the numbers drawn_position gives."""
    for world, per_round, rounds in ((1, 3, 2), (2, 2, 3), (4, 1, 2), (3, 2, 1)):
        one_rank = list(range(world * per_round * rounds))  # every group of the step, in drawn order
        for rank in range(world):
            rounds_of_one = [one_rank[r * world * per_round:(r + 1) * world * per_round] for r in range(rounds)]
            dealt = [g for round_list in rounds_of_one for g in round_list[rank::world]]
            assert ares.drawn_position(per_round * rounds, rounds, rank, world).tolist() == dealt, (world, rank)


KEEP_FIRST = '''
import json
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import ares
dist.init_process_group("gloo")
rank = dist.get_rank()
keep = torch.tensor([[True, False, True, True], [True, True, True, True]][rank])  # 2 groups of round 0, 2 of a refill
with open(f"{sys.argv[2]}/kept{rank}.json", "w") as f:  # a file per rank: two ranks' printed lines can interleave
    json.dump([ares.keep_first(keep, n, rounds=2).tolist() for n in (2, 4, 8)], f)
dist.destroy_process_group()
'''


def test_keep_first_under_torchrun_keeps_what_one_rank_keeps_round_by_round(tmp_path):
    """--batch-size 4 on 2 ranks, one refill round: each rank holds 2 groups of round 0, then 2 of the refill round
    (rank 0's filter keeps [T, F, T, T], rank 1's [T, T, T, T]). Dealt round-robin, one rank's drawn order is round 0
    [T, T, F, T] (rank 0's first, rank 1's first, rank 0's second, ...), then the refill round [T, T, T, T]. By hand:
    n = 2 keeps groups 0 and 1 of that order, one on each rank; n = 4 keeps 0, 1, 3 and 4 (before: rank-major, rank
    0 kept 3 groups, its refill ones before rank 1's round 0, and rank 1 only 1); n = 8 keeps all 7."""
    (tmp_path / "keep_first.py").write_text(KEEP_FIRST)
    run_script([tmp_path / "keep_first.py", ROOT, tmp_path], nproc=2)
    got = {rank: json.loads((tmp_path / f"kept{rank}.json").read_text()) for rank in (0, 1)}
    T, F = True, False
    assert got[0] == [[T, F, F, F], [T, F, T, F], [T, F, T, T]]  # n = 2, 4, 8
    assert got[1] == [[T, F, F, F], [T, T, F, F], [T, T, T, T]]


def test_a_refill_round_draws_only_records_its_step_has_not_drawn(monkeypatch):
    """--batch-size 2, 6 records: round 0 and two refill rounds draw each record once, at every step (before, a refill
    round drew from all records and could repeat one that round 0 had drawn); round 0 is the step's slice of its epoch's
shuffle, worked out here with torch.randperm. 5 records: the third round draws the one
    left, then one drawn before, never one twice. 2 ranks deal each round's list of 1 rank round-robin."""
    cfg = ares.Config(batch_size=2, seed=0)
    for step in range(10):
        rounds = [ares.draw(6, step, rnd, cfg) for rnd in range(3)]
        # round 0: the step's slice of its epoch's shuffle (3 steps of 2 an epoch), seeded by seed * 100_003 + epoch
        epoch_order = torch.randperm(6, generator=torch.Generator().manual_seed(0 * 100_003 + step // 3)).tolist()
        assert rounds[0] == epoch_order[2 * (step % 3):2 * (step % 3) + 2], (step, rounds)
        assert sorted(sum(rounds, [])) == [0, 1, 2, 3, 4, 5], rounds
    for epoch in range(3):  # the round-0 draws of an epoch's 3 steps: each record once
        assert sorted(sum((ares.draw(6, step, 0, cfg) for step in range(3 * epoch, 3 * epoch + 3)), [])) == list(range(6))
        rounds = [ares.draw(5, step, rnd, cfg) for rnd in range(3)]
        first_two = sum(rounds[:2], [])
        assert len(set(first_two)) == 4 and len(set(rounds[2])) == 2, rounds
        assert len(set(rounds[2]) - set(first_two)) == 1 and set(sum(rounds, [])) == {0, 1, 2, 3, 4}, rounds
    one = [ares.draw(6, 3, rnd, cfg) for rnd in range(3)]
    monkeypatch.setattr(ares, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(ares, "rank", lambda r=r: r)
        shares.append([ares.draw(6, 3, rnd, cfg) for rnd in range(3)])
    assert [[a, b] for (a,), (b,) in zip(*shares)] == one  # rank 0 the first of each round's two, rank 1 the second


def test_level_stats_count_each_group_once_in_its_online_bucket_by_hand():
    """The demo's per-level rows (level_<label>_len/n_he/acc and _groups_<bucket>, App. G): G = 4, four groups of
    three levels. Each group counts once, in the online bucket of its own responses (not of other rows); the means are
    over the level's responses. Every value is worked out by hand below."""
    G = 4
    recs = [{"difficulty": "hard"}, {"difficulty": "easy"}, {"difficulty": "hard"}, {"difficulty": "medium"}]
    acc = [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]  # 4/4 easy, 1/4 hard, 2/4 medium, 3/4 easy
    bucket = [0] * 4 + [2] * 4 + [1] * 4 + [0] * 4  # App. G: easy >= 2/3, medium >= 1/3, else hard
    lengths = [10, 20, 30, 40, 3, 5, 7, 9, 6, 2, 4, 4, 10, 10, 12, 16]
    n_he = [1, 0, 2, 1, 0, 0, 1, 0, 3, 3, 0, 2, 2, 2, 2, 2]
    sc = types.SimpleNamespace(acc=torch.tensor(acc, dtype=torch.float64), lengths=torch.tensor(lengths),
                               n_he=torch.tensor(n_he, dtype=torch.float64), bucket=torch.tensor(bucket))
    row = ares.level_stats(["easy", "medium", "hard"], recs, sc, G)
    want = {
        # "hard": groups 0 and 2 -> lengths (100 + 16) / 8, N_HE (4 + 8) / 8, acc (4 + 2) / 8; one easy, one medium
        "level_hard_len": 14.5, "level_hard_n_he": 1.5, "level_hard_acc": 0.75,
        "level_hard_groups_easy": 1, "level_hard_groups_medium": 1, "level_hard_groups_hard": 0,
        # "easy": group 1 -> 24 / 4, 1 / 4, 1 / 4; its group fell in the hard bucket
        "level_easy_len": 6.0, "level_easy_n_he": 0.25, "level_easy_acc": 0.25,
        "level_easy_groups_easy": 0, "level_easy_groups_medium": 0, "level_easy_groups_hard": 1,
        # "medium": group 3 -> 48 / 4, 8 / 4, 3 / 4; its group fell in the easy bucket
        "level_medium_len": 12.0, "level_medium_n_he": 2.0, "level_medium_acc": 0.75,
        "level_medium_groups_easy": 1, "level_medium_groups_medium": 0, "level_medium_groups_hard": 0,
    }
    assert row == pytest.approx(want)
    assert {k for k in row if "_groups_" in k} == {k for k in want if "_groups_" in k}


def test_reward_fn_replaces_the_grader_and_refill_fills_every_batch(tiny_ckpt, demo_data, tmp_path):
    (tmp_path / "my_reward.py").write_text(REWARD)
    out = tmp_path / "run"
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 3, "--reward-fn", f"{tmp_path}/my_reward.py:score",
                        "--max-refill-rounds", 6, "--entropy-shaping", "none"))
    calls = data_prep.load_reward_fn(f"{tmp_path}/my_reward.py:score").__globals__["calls"]  # the loaded module's
    rows = read_jsonl(out / "metrics.jsonl")
    ids = [rid for rid, _ in calls][::4]  # one entry per group (G = 4 calls, in order)
    at = 0
    for r in rows:
        groups = ids[at:at + r["groups"]]
        at += r["groups"]
        mixed = sum(int(g[-1]) % 3 == 0 for g in groups)  # by hand, from the reward's rule
        assert r["prompts_drawn"] == r["groups"] == 2 * r["rollout_rounds"] and 1 <= r["rollout_rounds"] <= 7
        assert r["groups_kept"] == min(2, mixed)
        assert mixed >= 2 or r["rollout_rounds"] == 7
        assert sum(int(g[-1]) % 3 == 0 for g in groups[:-2]) < 2  # it stops as soon as the batch is full
        assert r["acc"] == pytest.approx(mixed * 2 / (4 * r["groups"]))  # half of each mixed group's responses score 1
        assert r["reward"] == pytest.approx(r["acc"])  # --entropy-shaping none: R = the hook's score
    assert at == len(ids) and any(r["rollout_rounds"] > 1 for r in rows)
    assert json.loads((out / "config.json").read_text())["flags"]["reward_fn"].endswith("my_reward.py:score")


def test_reward_fn_by_module_name_from_pythonpath_in_the_command_line_run(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """README "Forking": --reward-fn module:function takes a module importable from where ares.py runs (installed, or
    on PYTHONPATH), not only a file.py. `python ares.py` itself, in its own process: every response is scored by the
    hook, and each step's accuracy is the hook's scores, recomputed here from the ids it was called with."""
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "my_scores.py").write_text(
        "import os\n\n\ndef score(record, response):\n    with open(os.environ['ARES_TEST_CALLS'], 'a') as f:\n"
        "        f.write(record['id'] + '\\n')\n    return float(int(record['id'][-1]) % 3 == 0)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hooks"))
    monkeypatch.setenv("ARES_TEST_CALLS", str(tmp_path / "calls.txt"))
    out = tmp_path / "run"
    run_script(["ares.py", *aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--reward-fn", "my_scores:score",
                                      "--entropy-shaping", "none", "--keep-uniform-groups")])
    ids = (tmp_path / "calls.txt").read_text().split()
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(ids) == sum(4 * r["groups"] for r in rows) == 2 * 2 * 4  # 2 steps x 2 prompts x G = 4
    for k, r in enumerate(rows):
        step = ids[8 * k:8 * (k + 1)]  # the step's 2 prompts x 4 responses, in order
        assert r["acc"] == pytest.approx(sum(int(i[-1]) % 3 == 0 for i in step) / len(step))
        assert r["reward"] == pytest.approx(r["acc"])
    assert json.loads((out / "config.json").read_text())["flags"]["reward_fn"] == "my_scores:score"


@pytest.mark.parametrize("spec, words", [("nofile.py:f", "no such file nofile.py"), ("json:nope", "has no function 'nope'"),
                                         ("no_such_module_x:f", "cannot import no_such_module_x"), ("justaname", "give file.py:fn or module:fn")])
def test_a_bad_reward_fn_is_one_line_naming_the_flag(spec, words, tmp_path):
    with pytest.raises(SystemExit, match=words) as e:
        ares.parse_config(["--stage", "aepo", "--data", "x", "--out", str(tmp_path), "--reward-fn", spec])
    assert str(e.value).startswith(f"--reward-fn {spec}")


def test_a_reward_outside_0_1_names_the_function_and_record(tmp_path):
    (tmp_path / "bad.py").write_text("def f(record, response):\n    return 1.5\n")
    with pytest.raises(SystemExit, match="returned 1.5 .float. for record r1"):
        data_prep.score_responses([dict(id="r1", answer="1")], ["a", "b"], 2, f"{tmp_path}/bad.py:f")


REFILL_DRIVER = '''
import sys
from pathlib import Path
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import ares
save = ares.save_checkpoint


def dump_then_save(path, name, policy, opt, sched, processor, state, keep_last):
    if name == "final":
        torch.save(dict(params={n: p.detach().clone() for n, p in policy.named_parameters()}, state=state),
                   path / f"rank{dist.get_rank()}.pt")
    return save(path, name, policy, opt, sched, processor, state, keep_last)


ares.save_checkpoint = dump_then_save
ares.main(sys.argv[2:])  # the command line's entry point, as `torchrun ares.py` runs it
'''


def test_refill_draws_nothing_more_with_keep_uniform_groups(tiny_ckpt, demo_data, tmp_path):
    """README (flags, dynamic sampling): with --keep-uniform-groups nothing is filtered, so nothing is refilled. A hook
    scoring every response 1 leaves no group mixed, which without the flag refills up to --max-refill-rounds."""
    (tmp_path / "hook.py").write_text("def score(record, response):\n    return 1.0\n")
    for flags, rounds in (([], 3), (["--keep-uniform-groups"], 1)):
        out = tmp_path / f"run{rounds}"
        ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 1, "--max-refill-rounds", 2, "--reward-fn",
                            f"{tmp_path / 'hook.py'}:score", *flags))
        (row,) = read_jsonl(out / "metrics.jsonl")
        assert (row["rollout_rounds"], row["prompts_drawn"]) == (rounds, 2 * rounds), flags
        assert row["groups_kept"] == (2 if flags else 0)


def test_refill_under_torchrun_takes_the_same_decisions_on_both_ranks(tiny_ckpt, demo_data, tmp_path):
    (tmp_path / "my_reward.py").write_text(REWARD)
    (tmp_path / "driver.py").write_text(REFILL_DRIVER)
    out = tmp_path / "run"
    run_script([tmp_path / "driver.py", ROOT, *aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--reward-fn",
                                                         f"{tmp_path}/my_reward.py:score", "--max-refill-rounds", 4)], nproc=2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k
    assert ranks[0]["state"]["tau_history"] == ranks[1]["state"]["tau_history"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(r["prompts_drawn"] == r["groups"] == 2 * r["rollout_rounds"] for r in rows)
    assert all(r["groups_kept"] == 2 or r["rollout_rounds"] == 5 for r in rows)


# ----------------------------------------------------------------------------------------------------------
# 5. Validation during AEPO


def test_validation_logs_what_eval_py_measures_on_the_checkpoint(tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    import shlex

    import eval as evaluation

    out = tmp_path / "my run"  # a space: the command printed at the end must still work when pasted
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 3, "--keep-uniform-groups", "--eval-data",
                        demo_data["test"], "--eval-every", 2, "--lr", "1e-2"))
    rows = read_jsonl(out / "metrics.jsonl")
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("curves of this run: "))
    python, script, *argv = shlex.split(printed.removeprefix("curves of this run: "))
    assert (python, script, argv) == ("python", "eval.py", ["curves", str(out / "metrics.jsonl")])
    evaluation.main(argv)
    assert "eval_acc" not in rows[0] and "eval_acc" in rows[1] and (out / "curves.png").stat().st_size > 0
    last = rows[2]  # every 2nd step and the last, whose checkpoint is final/: eval.py measures it below
    res = evaluation.evaluate(evaluation.parse_config(["--model", str(out / "final"), "--data", str(demo_data["test"]),
                                                       "--out", str(tmp_path / "eval"), "--max-new-tokens", "12"]))
    summary = next(iter(next(iter(res["metrics"].values())).values()))
    assert last["eval_acc"] == summary["overall"]["accuracy"]
    assert last["eval_len"] == summary["overall"]["mean_tokens"]
    for level, m in summary["buckets"].items():
        assert (last[f"eval_{level}_acc"], last[f"eval_{level}_len"]) == (m["accuracy"], m["mean_tokens"])
    assert len(summary["buckets"]) == 3
    figures = []
    monkeypatch.setattr(evaluation, "save_figure", lambda plt, fig, png: figures.append(fig) or True)
    evaluation.plot_curves(out / "metrics.jsonl", tmp_path / "c.png")
    ax = next(a for a in figures[0].axes if a.get_title() == "held-out accuracy (--eval-data)")
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "acc")
    assert list(line.get_xdata()) == [2, 3] and line.get_ydata()[-1] == last["eval_acc"]  # the validated steps


def test_eval_every_without_eval_data_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--eval-every needs --eval-data"):
        ares.parse_config(["--stage", "aepo", "--data", "x", "--out", str(tmp_path), "--eval-every", "5"])


# ----------------------------------------------------------------------------------------------------------
# 6. LoRA


def test_hf_export_merges_w_plus_scaled_ba_as_the_lora_forward_computes_it():
    """Without peft: the export of a hand-built LoRA state dict against the LoRA forward y = x W^T + s (x A^T) B^T."""
    torch.manual_seed(0)
    W, b, A, B = torch.randn(5, 3), torch.randn(5), torch.randn(2, 3), torch.randn(5, 2)
    sd = {"m.q_proj.base_layer.weight": W, "m.q_proj.base_layer.bias": b, "m.q_proj.lora_A.default.weight": A,
          "m.q_proj.lora_B.default.weight": B, "m.norm.weight": torch.ones(3)}
    hf = types.SimpleNamespace(ares_lora=types.SimpleNamespace(lora_alpha=8, r=2))
    weights, adapter = ares.hf_export(hf, sd)
    assert set(weights) == {"m.q_proj.weight", "m.q_proj.bias", "m.norm.weight"}
    assert set(adapter) == {"base_model.model.m.q_proj.lora_A.weight", "base_model.model.m.q_proj.lora_B.weight"}
    x = torch.randn(4, 3)
    lora_forward = x @ W.T + b + 4.0 * (x @ A.T) @ B.T  # scale alpha / r = 8 / 2
    torch.testing.assert_close(x @ weights["m.q_proj.weight"].T + weights["m.q_proj.bias"], lora_forward)
    assert ares.hf_export(types.SimpleNamespace(), sd) == (sd, {})


def weights(folder) -> dict:
    """A saved model's weights under its modules' names (the file may use the family's older key layout)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def merged_by_hand(base: dict, adapter: dict, scale: float) -> dict:
    """W + scale * B A for every adapted layer of a peft adapter file, the other weights as in the base."""
    out = dict(base)
    for k, A in adapter.items():
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            out[name] = base[name] + scale * adapter[k.replace(".lora_A.", ".lora_B.")] @ A
    return out


def test_lora_trains_only_adapters_its_reference_is_the_base_and_peft_reads_the_checkpoint(tiny_ckpt, demo_data,
                                                                                          tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    common = ["--steps", 2, "--keep-uniform-groups", "--lora-rank", 4, "--lr", "1e-2"]
    ares.main(aepo_args(demo_data["rl"], tmp_path / "plain", tiny_ckpt, *common))
    base = weights(tiny_ckpt)
    adapter = load_file(str(tmp_path / "plain" / "final" / "adapter" / "adapter_model.safetensors"))
    exported = weights(tmp_path / "plain" / "final")
    by_hand = merged_by_hand(base, adapter, 8 / 4)  # alpha 2R by default: scale 2; only the adapters trained
    assert set(exported) == set(base) and all(torch.allclose(exported[k], by_hand[k], atol=1e-6) for k in base)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B started at 0
    assert not any("visual" in k for k in adapter)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_ckpt),
                                      tmp_path / "plain" / "final" / "adapter").merge_and_unload()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "plain" / "final").state_dict()
    for k, v in model.state_dict().items():  # peft's own merge of our adapter = our merged export
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5)
    start = AutoModelForImageTextToText.from_pretrained(tiny_ckpt).state_dict()
    assert any(not torch.equal(merged[k], start[k]) for k in start)
    # the KL reference: the trained policy (the starting model + the trained adapter) with adapters off is the start
    cfg = ares.resolve_stage_defaults(ares.parse_config(aepo_args(demo_data["rl"], tmp_path / "x", tiny_ckpt,
                                                                  "--lora-rank", 4)), "aepo")
    run = ares.load_for_training(cfg, torch.device("cpu"))
    run.model = ares.Policy(run.hf)
    for k, v in adapter.items():  # the trained adapter into the injected model
        name = k.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        run.hf.get_parameter(name).data.copy_(v)
    start = ares.Policy(AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval())
    record = data_prep.load_records(str(demo_data["rl"]))[0]
    prompt = data_prep.encode_prompt(run.processor, record)
    batch = ares.make_batch(run.hf, [prompt], [torch.tensor([100, 101, 102])], run.ids["pad"], "cpu")
    with torch.no_grad():
        ref, lora, base_lp = ares.lora_reference(run.hf, run.model)(batch)[0], run.model(batch)[0], start(batch)[0]
    torch.testing.assert_close(ref, base_lp)
    assert not torch.allclose(lora, base_lp)


def test_lora_under_torchrun_ddp_keeps_ranks_identical_and_the_base_frozen(tiny_ckpt, demo_data, tmp_path):
    pytest.importorskip("peft")
    (tmp_path / "driver.py").write_text(REFILL_DRIVER)
    out = tmp_path / "run"
    run_script([tmp_path / "driver.py", ROOT, *aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--lora-rank", 4,
                                                         "--keep-uniform-groups", "--lr", "1e-2")], nproc=2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False)["params"] for r in (0, 1)]
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in ranks[0].items())
    base, saved = weights(tiny_ckpt), weights(out / "final")  # the merged policy: the base + its adapters only
    by_hand = merged_by_hand(base, load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")), 2.0)
    assert all(torch.allclose(by_hand[k], saved[k], atol=1e-6) for k in base)


def test_lora_resume_gives_the_adapters_of_an_uninterrupted_run(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    common = ["--steps", 3, "--keep-uniform-groups", "--lora-rank", 4, "--lr", "1e-2", "--save-every", 1]
    ares.main(aepo_args(demo_data["rl"], tmp_path / "straight", tiny_ckpt, *common))
    out = tmp_path / "interrupted"
    run_until_first_step_save(monkeypatch, lambda: ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common)))
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, *common, "--resume"))
    a, b = (load_file(str(d / "final" / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # README (LoRA): every checkpoint's export is the merged policy, a step's as the final's: step 2's, adapters trained
    step = tmp_path / "straight" / "step_000002"
    adapter = load_file(str(step / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    base, saved = weights(tiny_ckpt), weights(step)
    by_hand = merged_by_hand(base, adapter, 2.0)
    assert all(torch.allclose(by_hand[k], saved[k], atol=1e-6) for k in base)


def test_lora_cold_start_trains_only_the_adapters(tiny_ckpt, demo_data, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "cold"
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out", str(out),
               "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--lora-rank", "4", "--lr", "1e-2"])
    base, saved = weights(tiny_ckpt), weights(out / "final")
    adapter = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    by_hand = merged_by_hand(base, adapter, 2.0)
    assert all(torch.allclose(by_hand[k], saved[k], atol=1e-6) for k in base)  # the base frozen, adapters merged
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_lora_with_fsdp_is_refused(tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(SystemExit, match="--lora-rank does not work with --fsdp"):
        ares.parse_config(["--stage", "aepo", "--data", "x", "--out", str(tmp_path), "--lora-rank", "4", "--fsdp"])


# ----------------------------------------------------------------------------------------------------------
# 7. Hub data in ares.py through data_prep's presets


def test_geometry3k_columns_train_with_the_preset_and_fail_clearly_without(tiny_ckpt, demo_data, tmp_path):
    import datasets

    rows = [json.loads(line) for line in open(demo_data["rl"])][:4]
    base = demo_data["rl"].parent
    hub_like = datasets.Dataset.from_dict(  # the hub card's columns: problem, answer, images (a sequence), id
        {"problem": ["<image>" + r["question"] for r in rows], "answer": [r["answer"] for r in rows],
         "images": [[str(base / im) for im in r["images"]] for r in rows], "id": [f"g{k}" for k in range(4)]},
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    hub_like.save_to_disk(str(tmp_path / "geo"))
    out = tmp_path / "run"
    ares.main(aepo_args(tmp_path / "geo", out, tiny_ckpt, "--steps", 1, "--preset", "geometry3k", "--keep-uniform-groups"))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert json.loads((out / "config.json").read_text())["flags"]["preset"] == "geometry3k"
    records = data_prep.read_records(str(tmp_path / "geo"), preset="geometry3k")
    assert [r["question"] for r in records] == [r["question"] for r in rows]  # "<image>" stripped, as data_prep does
    assert [r["id"] for r in records] == ["g0", "g1", "g2", "g3"] and all(len(r["images"]) == 1 for r in records)
    with pytest.raises(SystemExit, match="missing or empty field 'question'"):
        ares.main(aepo_args(tmp_path / "geo", tmp_path / "bad", tiny_ckpt, "--steps", 1))
    with pytest.raises(SystemExit, match="--preset nope: unknown; presets: virl39k, geometry3k"):
        ares.parse_config(["--stage", "aepo", "--data", "x", "--out", str(tmp_path), "--preset", "nope"])


ID_REWARD = '''
def score(record, response):
    """Every record graded, by id, to a file: training's and validation's calls alike."""
    with open(__file__ + ".log", "a") as f:
        f.write(record["id"] + "\\n")
    return 0.0
'''


def test_eval_data_a_preset_name_validates_on_its_test_split_not_on_the_split_data_trains_on(tiny_ckpt, demo_data,
                                                                                             tmp_path, monkeypatch):
    """README (flags): --eval-data takes a data_prep preset name and validates on held-out records. geometry3k's preset
    split is train, which --data hiyouga/geometry3k --preset geometry3k trains on: --eval-data geometry3k read it too,
    so validation graded the training problems. Now a training preset is read from its test split (a folder's
    --eval-data reads test too). A stand-in hub serves geometry3k's columns by split, ids train0.. and test0.."""
    import datasets

    rows, base = [json.loads(line) for line in open(demo_data["rl"])][:8], demo_data["rl"].parent
    hub = {split: datasets.Dataset.from_dict(
        {"problem": ["<image>" + r["question"] for r in part], "answer": [r["answer"] for r in part],
         "images": [[str(base / im) for im in r["images"]] for r in part], "id": [f"{split}{k}" for k in range(4)]},
    ).cast_column("images", datasets.Sequence(datasets.Image()))
        for split, part in (("train", rows[:4]), ("test", rows[4:]))}
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, **kw: asked.append(
        (name, split)) or hub[split])
    hook = tmp_path / "hook.py"
    hook.write_text(ID_REWARD)
    out = tmp_path / "run"
    ares.main(aepo_args("hiyouga/geometry3k", out, tiny_ckpt, "--steps", 1, "--preset", "geometry3k", "--eval-data",
                        "geometry3k", "--reward-fn", f"{hook}:score", "--keep-uniform-groups"))
    assert sorted(asked) == [("hiyouga/geometry3k", "test"), ("hiyouga/geometry3k", "train")]
    graded = open(f"{hook}.log").read().split()
    assert len(graded) == 2 * 4 + 4  # 2 prompts x G = 4 in training, then the 4 held-out records once each (greedy)
    assert all(i.startswith("train") for i in graded[:8]) and sorted(graded[8:]) == ["test0", "test1", "test2", "test3"]
    assert read_jsonl(out / "metrics.jsonl")[-1]["eval_acc"] == 0.0


def test_split_picks_the_split_of_a_saved_dataset_that_training_reads_and_eval_data_reads_its_test(tiny_ckpt, tmp_path):
    """README (flags): --split names the split of --data to train on, and --eval-data a folder validates on its test
    split. A saved DatasetDict with train, validation and test splits of other records, --split validation and
    --eval-data the same folder: every training response is to a validation record, and validation (at the last
    step) grades each test record once."""
    import datasets

    def split(name):
        return datasets.Dataset.from_dict(dict(id=[f"{name}{k}" for k in range(4)], answer=[str(k) for k in range(4)],
                                               question=[f"What is {k} + 0?" for k in range(4)]))

    datasets.DatasetDict(train=split("train"), validation=split("validation"), test=split("test")).save_to_disk(
        str(tmp_path / "saved"))
    hook = tmp_path / "hook.py"
    hook.write_text(ID_REWARD)
    ares.main(aepo_args(tmp_path / "saved", tmp_path / "run", tiny_ckpt, "--steps", 2, "--split", "validation",
                        "--reward-fn", f"{hook}:score", "--keep-uniform-groups", "--eval-data", tmp_path / "saved"))
    graded = open(f"{hook}.log").read().split()
    assert len(graded) == 2 * 2 * 4 + 4 and all(i.startswith("validation") for i in graded[:16]), graded
    assert sorted(graded[16:]) == ["test0", "test1", "test2", "test3"]


def test_eval_data_a_benchmark_preset_validates_on_its_own_split(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """--eval-data mathvista-testmini reads MathVista's testmini, the preset's own split (a training preset's own split
    is train, and reads test instead: the test above). The stage stops at that read: which split it asked is all."""
    asked, real = [], data_prep.read_records

    def reading(data, split=None, *args, **kw):
        if data == "mathvista-testmini":
            asked.append(split)
            raise data_prep.DataError("read no further")
        return real(data, split, *args, **kw)

    monkeypatch.setattr(data_prep, "read_records", reading)
    with pytest.raises(SystemExit, match="--eval-data: read no further"):
        ares.main(aepo_args(demo_data["rl"], tmp_path / "run", tiny_ckpt, "--eval-data", "mathvista-testmini"))
    assert asked == ["testmini"]


# ----------------------------------------------------------------------------------------------------------
# README claims checked through the user's path (ares.main): logged keys, --eval-every 0, --report-to tensorboard,
# --lora-targets, LoRA with --train-vision, the prompt suffix, and the run record's versions and commit.


def test_cold_start_logs_lr_grad_norm_skipped_tokens_per_s_and_mfu_and_tensorboard_gets_every_number(
        tiny, tiny_ckpt, demo_data, tmp_path):
    """README "What is logged": the cold start logs loss, lr, grad_norm, skipped, tokens_per_s (response tokens) and
    mfu (on a GPU); --report-to tensorboard sends every number of each row at its step to <out>/tensorboard."""
    pytest.importorskip("tensorboard")
    import copy
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import reference_sft_loss, subset

    data = subset(Path(demo_data["sft"]), tmp_path / "two.jsonl", [0, 2])
    model = copy.deepcopy(tiny[0])  # by hand: the first step's gradient, one plain model(...) call per record
    loss_sum, count = reference_sft_loss(model, tiny[1], data)
    (loss_sum / count).backward()
    norm = torch.stack([p.grad.norm() for n, p in model.named_parameters() if "visual" not in n]).norm().item()
    out = tmp_path / "run"  # warm-up 4 of a constant schedule: optimizer step k (from 0) uses 1e-3 (k + 1) / 4
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(out),
               "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-steps", "4",
               "--lr-schedule", "constant", "--report-to", "tensorboard"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4], rel=1e-12)
    assert rows[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the norm before clipping (--grad-clip 1)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert [r["skipped"] for r in rows] == [False, False] and [r["mfu"] for r in rows] == [None, None]  # CPU: no peak
    for r in rows:  # both records every step: the response tokens (trace + <|im_end|>) counted by hand, per second
        assert r["tokens_per_s"] > 0 and r["tokens_per_s"] * r["time"] == pytest.approx(count, rel=1e-9)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    numbers = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}  # bools too
    assert set(events.Tags()["scalars"]) == numbers and "loss" in numbers and "mfu" not in numbers
    for k in numbers:  # float32 in the event file
        assert [(e.step, e.value) for e in events.Scalars(k)] == [(r["step"], pytest.approx(float(r[k]), rel=1e-6))
                                                                   for r in rows], k


LOGGING_REWARD = '''
import json


def score(record, response):
    """Every response to a file, by hand; scores 0, 1, 0, 1, ... in grading order: every group of 4 is mixed."""
    with open(__file__ + ".log", "a") as f:
        f.write(json.dumps(response) + "\\n")
    with open(__file__ + ".log") as f:
        return float(sum(1 for _ in f) % 2 == 0)
'''


def test_eval_every_0_turns_validation_off_with_eval_data_and_aepo_logs_format_kl_grad_norm_and_lr(
        tiny_ckpt, demo_data, tmp_path):
    """README: "--eval-every 0 turns it off" (no eval_* keys even with --eval-data); AEPO logs format (share of
    responses with <think>..</think> then \\boxed{}), kl, grad_norm and lr (after the step's optimizer steps)."""
    import re

    hook = tmp_path / "hook.py"
    hook.write_text(LOGGING_REWARD)
    out = tmp_path / "run"  # 2 minibatches x 2 steps = 4 optimizer steps, cosine after 1 warm-up step
    ares.main(aepo_args(demo_data["rl"], out, tiny_ckpt, "--steps", 2, "--keep-uniform-groups", "--eval-data",
                        demo_data["test"], "--eval-every", 0, "--reward-fn", f"{hook}:score", "--lr", "1e-2",
                        "--minibatches", 2, "--ppo-epochs", 1, "--warmup-steps", 1, "--lr-schedule", "cosine"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert not [k for r in rows for k in r if k.startswith("eval_")]
    assert json.loads((out / "config.json").read_text())["flags"]["eval_every"] == 0
    # by hand: each step logs the rate of its first optimizer step k (from 0; 2 per step): warm-up (k = 0) 1, then
    # 0.1 + 0.45 (1 + cos(pi (k - 1) / 3)) for k = 2
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 1e-2 * (0.1 + 0.45 * 1.5)], rel=1e-12)
    responses = [json.loads(line) for line in open(f"{hook}.log")]
    assert len(responses) == 2 * 8  # 2 prompts x G = 4 per step, each graded once (no validation calls)
    formatted = [bool(re.match(r"\s*<think>.*\S.*</think>.*\\boxed\{", t, re.S)) for t in responses]
    for k, r in enumerate(rows):
        assert r["format"] == pytest.approx(sum(formatted[8 * k:8 * k + 8]) / 8)
        assert r["acc"] == 0.5  # the hook's alternating scores: every group mixed, so the update has a gradient
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert math.isfinite(r["kl"]) and r["kl"] >= 0
    assert rows[1]["kl"] > 0  # the policy has moved away from the reference by the second step


def lora_run(tiny_ckpt, demo_data, out, *extra) -> dict:
    """One LoRA AEPO step with --lora-targets q_proj,v_proj (weight decay 0: only a gradient moves a weight; mixed
    groups: a gradient) -> the saved adapter and the merged export."""
    out.mkdir()
    (out / "hook.py").write_text(LOGGING_REWARD)
    ares.main(aepo_args(demo_data["rl"], out / "run", tiny_ckpt, "--steps", 1, "--keep-uniform-groups",
                        "--lora-rank", 4, "--lora-targets", "q_proj,v_proj", "--lr", "1e-2", "--weight-decay", 0,
                        "--reward-fn", f"{out / 'hook.py'}:score", *extra))
    out = out / "run"
    return dict(adapter=load_file(str(out / "final" / "adapter" / "adapter_model.safetensors")),
                config=json.loads((out / "final" / "adapter" / "adapter_config.json").read_text()),
                merged=load_file(str(out / "final" / "model.safetensors")), final=out / "final")


def test_a_lora_adapter_trained_from_tiny_applies_to_the_tiny_model_its_seed_rebuilds(demo_data, tmp_path):
    """README (LoRA): from --model tiny, no folder holds the starting model; adapter_config.json names it `tiny`, and
    ares.build_tiny(<the run's --seed>) rebuilds it, to which peft applies the adapter: peft's merge is the merged
    export, weight for weight (another seed's model is not)."""
    pytest.importorskip("peft")
    from peft import PeftModel

    out = tmp_path / "run"
    ares.main(aepo_args(demo_data["rl"], out, "tiny", "--steps", 1, "--keep-uniform-groups", "--lora-rank", 4,
                        "--lr", "1e-2", "--seed", 3))
    config = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    exported = load_file(str(out / "final" / "model.safetensors"))
    for seed, same in ((3, True), (0, False)):
        merged = PeftModel.from_pretrained(ares.build_tiny(seed)[0], out / "final" / "adapter").merge_and_unload()
        merged = merged.state_dict()
        name = "model.language_model.layers.0.self_attn.q_proj.weight"  # the file's name: model.layers.0...
        assert torch.allclose(merged[name], exported["model.layers.0.self_attn.q_proj.weight"], atol=1e-6) is same
        if same:
            moved = [k for k in merged if "q_proj" in k and k.endswith("weight")]
            assert moved and all(torch.allclose(merged[k], exported[k.replace("language_model.", "")], atol=1e-6)
                                 for k in moved)


def test_lora_alpha_scales_the_adapters_by_alpha_over_rank(tiny_ckpt, demo_data, tmp_path):
    """README (flags): --lora-alpha (default 2R, which the test above checks; scale alpha/R). After one step of rank 4
    with --lora-alpha 3, an adapted weight of the merged export is the starting weight + 3/4 B A of the saved
    adapter, worked out here, and the adapter's config holds alpha 3."""
    pytest.importorskip("peft")
    run = lora_run(tiny_ckpt, demo_data, tmp_path / "lora", "--lora-alpha", 3)
    want = 3
    assert (run["config"]["lora_alpha"], run["config"]["r"]) == (want, 4)
    start = load_file(str(tiny_ckpt / "model.safetensors"))
    A, B = (run["adapter"][f"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_{m}.weight"]
            for m in "AB")
    assert B.abs().max() > 0  # trained: B starts at 0
    name = "model.layers.0.self_attn.q_proj.weight"  # the file's name of that weight (the starting model's too)
    torch.testing.assert_close(run["merged"][name], start[name] + want / 4 * B @ A)


def test_lora_targets_q_v_adapt_only_q_proj_and_v_proj_and_train_vision_also_trains_the_vision_tower(
        tiny, tiny_ckpt, demo_data, tmp_path):
    """README (flags, LoRA): --lora-targets q_proj,v_proj puts adapters on those layers only (the vision tower never
    gets one); --train-vision also trains the vision tower, which stays as it was without it. Against the starting
    model's own file: which weights of the merged export moved after one step."""
    pytest.importorskip("peft")
    start = load_file(str(tiny_ckpt / "model.safetensors"))  # the starting model's file, as written
    layers = tiny[0].config.get_text_config().num_hidden_layers
    runs = {flag: lora_run(tiny_ckpt, demo_data, tmp_path / (flag.strip("-") or "frozen"), *([flag] if flag else []))
            for flag in ("", "--train-vision")}
    for flag, run in runs.items():
        lora = {k for k in run["adapter"] if ".lora_" in k}
        adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in lora}
        assert adapted == {f"model.language_model.layers.{i}.self_attn.{p}" for i in range(layers)
                           for p in ("q_proj", "v_proj")}, flag
        assert {k.split(".lora_")[1] for k in lora} == {"A.weight", "B.weight"}
        assert sorted(run["config"]["target_modules"]) == ["q_proj", "v_proj"]
        assert run["merged"].keys() == start.keys()
        moved = {k for k in start if not torch.equal(run["merged"][k], start[k])}
        language = {k for k in moved if "visual" not in k}  # the merged W + s B A: only the adapted layers move
        assert language and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in language), (flag, language)
        vision = {k for k in start if "visual" in k}
        if flag:  # the vision tower trains too (no adapter: its own weights)
            assert vision & moved, "--train-vision: the vision tower did not move"
        else:
            assert not vision & moved, vision & moved


@pytest.mark.parametrize("flag", ["", "--train-vision"])
def test_peft_rebuilds_the_trained_model_from_the_starting_model_and_the_adapter(flag, tiny, tiny_ckpt, demo_data,
                                                                                  tmp_path):
    """README (LoRA): PeftModel.from_pretrained(<starting model>, "<checkpoint>/adapter") is the trained policy. With
    --train-vision the tower trains whole, and adapter/ held none of it: peft rebuilt the starting model's tower, a
    model that was never trained, silently. Against the merged export (the trained policy, whoever loads it): every
    weight of peft's merge, and the logits of an image prompt through peft's unmerged model."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run = lora_run(tiny_ckpt, demo_data, tmp_path / "lora", *([flag] if flag else []))
    start = lambda: AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval()  # noqa: E731
    trained = AutoModelForImageTextToText.from_pretrained(run["final"]).eval()
    rebuilt = PeftModel.from_pretrained(start(), run["final"] / "adapter").eval()
    record = data_prep.load_records(str(demo_data["rl"]))[0]
    prompt = data_prep.encode_prompt(tiny[1], record)
    image = dict(input_ids=prompt["ids"][None], pixel_values=prompt["pixel_values"],
                 image_grid_thw=prompt["image_grid_thw"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**image).logits, trained(**image).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(start()(**image).logits, trained(**image).logits, atol=1e-4)  # it did train
    merged, expected = rebuilt.merge_and_unload().state_dict(), trained.state_dict()
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_the_prompt_suffix_of_the_flag_or_the_model_folder_reaches_every_prompt_and_the_run_record_holds_it(
        tiny, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """README (flags, prompt): --prompt-suffix, default the model's own (`ares_prompt_suffix` in its config.json),
    else the authors' "You FIRST think ..."; the resolved text is in the run record and saved with the checkpoint.
    By hand: the token ids of every prompt the model is given, decoded by the tokenizer, end the question with it."""
    import shutil

    seen = []  # (question, the decoded prompt ids) of every prompt encoded during a run
    encode = ares.encode_prompts

    def spy(processor, records):
        prompts = encode(processor, records)
        seen.extend((r["question"], tiny[1].tokenizer.decode(p["ids"])) for r, p in zip(records, prompts))
        return prompts

    monkeypatch.setattr(ares, "encode_prompts", spy)
    folder_says, flag_says = "Folder: end with \\boxed{} please.", "Flag: think, then answer."
    models = {}
    for name, suffix in (("own", folder_says), ("none", None)):  # a model folder with its own suffix, one without
        models[name] = shutil.copytree(tiny_ckpt, tmp_path / name)
        config = json.loads((models[name] / "config.json").read_text())
        config.pop("ares_prompt_suffix", None)
        own = {"ares_prompt_suffix": suffix} if suffix else {}
        (models[name] / "config.json").write_text(json.dumps({**config, **own}))

    def coldstart(model, out):
        return ["--stage", "coldstart", "--model", str(model), "--data", str(demo_data["sft"]), "--out", str(out),
                "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2"]

    def aepo_with_flag(model, out):
        return aepo_args(demo_data["rl"], out, model, "--steps", 1, "--keep-uniform-groups", "--prompt-suffix",
                         flag_says)

    cases = [("own", coldstart, folder_says), ("none", coldstart, data_prep.FORMAT_PROMPT),
             ("own", aepo_with_flag, flag_says)]  # the flag wins over the folder's own
    for k, (model, args, want) in enumerate(cases):
        seen.clear()
        out = tmp_path / f"run{k}"
        ares.main(args(models[model], out))
        assert seen and all(text.endswith(f"{q}\n{want}<|im_end|>\n<|im_start|>assistant\n") for q, text in seen), \
            (k, seen[0][1][-300:])
        assert json.loads((out / "config.json").read_text())["flags"]["prompt_suffix"] == want
        assert json.loads((out / "final" / "config.json").read_text())["ares_prompt_suffix"] == want


def test_the_run_record_holds_the_package_versions_and_the_git_commit_of_the_code(tiny_ckpt, demo_data, tmp_path,
                                                                                   monkeypatch):
    """README (run record): <out>/config.json holds the versions of Python, torch, transformers, datasets,
    math-verify and the optional packages, and the git commit of the code, here against git's own answer and each
    package's own __version__, with the run started from a folder outside the checkout."""
    import importlib
    import importlib.metadata
    import importlib.util
    import platform
    import subprocess

    import datasets
    import transformers

    monkeypatch.chdir(tmp_path)  # not a git checkout: the commit is the code's, not the working folder's
    out = tmp_path / "run"
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(demo_data["sft"]), "--out", str(out),
               "--steps", "1", "--batch-size", "2", "--micro-batch-size", "2"])
    record = json.loads((out / "config.json").read_text())
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert record["git_commit"] == (git.stdout.strip() if git.returncode == 0 else None)  # None: not a checkout
    want = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "math-verify": importlib.metadata.version("math-verify")}
    for optional in ("peft", "tensorboard", "wandb"):  # None where it is not installed (wandb is not in requirements)
        want[optional] = importlib.import_module(optional).__version__ if importlib.util.find_spec(optional) else None
    assert record["versions"] == want
