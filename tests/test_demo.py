"""The embedded default, end to end at a reduced size: `python ares.py --demo-steps 2`. It checks that every stage of
the pipeline ran through its command and left what the next one reads; the learning results are benchmark figures
(README), not asserted here."""
import importlib
import json
from pathlib import Path

import ares
import pytest

ev = importlib.import_module("eval")  # `import eval` would shadow the builtin eval()
from conftest import run_script

LEVELS = ("easy", "medium", "hard")
MODELS = ("cold start", "ARES", "GRPO")


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_default_command_runs_every_stage_and_reports_every_field(tmp_path):
    out = tmp_path / "demo"
    res = run_script(["ares.py", "--demo-steps", "2", "--out", out], timeout=900)
    data = out / "data"
    for split in ("sft", "pool", "pool_traces", "rl", "test"):
        assert (data / f"{split}.jsonl").stat().st_size > 0
    # pass rates of the reference (warm-up) policy on every pool problem, K = 8 samples each
    rates = read_jsonl(data / "pass_rates.jsonl")
    assert len(rates) == len(read_jsonl(data / "pool.jsonl"))
    assert all(r["pass_rate"] in {k / 8 for k in range(9)} for r in rates)
    # AdaCS picked one teacher trace per kept problem, with the pass rate it was joined to
    curated = read_jsonl(data / "adacs.jsonl")
    rate_of = {r["id"]: r["pass_rate"] for r in rates}
    assert curated and len({r["id"] for r in curated}) == len(curated)
    assert all(r["pass_rate"] == rate_of[r["id"]] and r["style"] in ("terse", "steps", "recheck") for r in curated)
    for stage, steps in (("warmup", 10), ("coldstart", 10), ("aepo", 2), ("grpo", 2)):
        assert (out / stage / "final" / "COMPLETE").exists(), stage
        assert [r["step"] for r in read_jsonl(out / stage / "metrics.jsonl")] == list(range(1, steps + 1)), stage
    ares_row, grpo_row = read_jsonl(out / "aepo" / "metrics.jsonl")[-1], read_jsonl(out / "grpo" / "metrics.jsonl")[-1]
    for key in ("reward", "acc", "len", "n_he", "tau", "groups_kept", "branches", "time_sample", "time_update",
                *(f"{k}_{b}" for k in ("n", "len", "n_he", "acc", "target", "kappa", "branched", "kl_outside",
                                       "kl_inside") for b in LEVELS),
                *(f"level_{lv}_{k}" for lv in LEVELS for k in ("len", "n_he", "acc", "groups_easy"))):
        assert key in ares_row, key
    assert ares_row["branches"] > 0 and grpo_row["branches"] == 0  # the GRPO baseline does not branch
    # README (memory plan): on a CPU, --rollout-batch auto gives the tiny model a step's largest call: ARES's 16 prompts
    # x 4 first samples, GRPO's 16 x 8 sampled at once
    for run, rows in (("aepo", 64), ("grpo", 128)):
        assert f"--rollout-batch auto: {rows} rows per rank (" in (out / f"{run}.log").read_text(), run
    # both runs got the demo's AEPO flags and the same cold start, seed and steps; GRPO also got BASELINE's settings
    ares_flags, grpo_flags = (json.loads((out / run / "config.json").read_text())["flags"] for run in ("aepo", "grpo"))
    for flags in (ares_flags, grpo_flags):
        assert flags["keep_uniform_groups"] is True and flags["trigger_words"] is True
    assert {k: ares_flags[k] for k in ("entropy_shaping", "kl_mode", "clip_high", "dual_clip")} == dict(
        entropy_shaping="hierarchical", kl_mode="dynamic", clip_high=0.3, dual_clip=3.0)
    assert {k: grpo_flags[k] for k in ("entropy_shaping", "branch_samples", "kl_mode", "clip_high", "dual_clip")} == dict(
        entropy_shaping="none", branch_samples=0, kl_mode="fixed", clip_high=0.2, dual_clip=0.0)
    assert {k: v for k, v in grpo_flags.items() if k not in ("entropy_shaping", "branch_samples", "kl_mode", "clip_high",
                                                             "dual_clip", "out")} == \
        {k: v for k, v in ares_flags.items() if k not in ("entropy_shaping", "branch_samples", "kl_mode", "clip_high",
                                                          "dual_clip", "out")}
    for row in read_jsonl(out / "aepo" / "metrics.jsonl"):  # branched share x responses, summed over buckets
        assert sum(row[f"branched_{b}"] * row[f"n_{b}"] for b in LEVELS if row[f"n_{b}"]) == pytest.approx(row["branches"])
    assert all(grpo_row[f"branched_{b}"] in (0, None) for b in LEVELS)
    # the final table: the three checkpoints, every level and overall, greedy and sampled
    report = json.loads((out / "demo.json").read_text())
    for mode in ("greedy", "sampled"):
        metrics = report[mode]["metrics"]["test"]
        assert set(metrics) == set(MODELS)
        for model in metrics.values():
            assert set(model["buckets"]) == set(LEVELS)
            for row in [model["overall"], *model["buckets"].values()]:
                assert 0 <= row["accuracy"] <= 1 and row["mean_tokens"] > 0 and row["records"] > 0
        assert all(level in report[mode]["table"] for level in (*LEVELS, "overall"))
    assert set(report["times"]) == {"data", "warm-up", "pass rates", "adacs", "coldstart", "aepo", "eval"}
    for key in ("buckets", "buckets_first_half", "grpo_buckets"):  # per level, the share of its groups in each bucket
        assert set(report[key]) == set(LEVELS) and all(sum(v.values()) == pytest.approx(1) for v in report[key].values())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "explore.html").read_text()
    assert page.count('class="t') > 100 and "branched from" in page and "tau =" in page
    assert "cold start" in res.stdout and "ARES" in res.stdout and "stage times" in res.stdout
    assert "--nproc_per_node=2 eval.py passrate" in res.stdout and "$ python data_prep.py adacs" in res.stdout
    # the same command again stops with one line and changes nothing; the demo does not resume (README: two commands)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as again:
        ares.main(["--demo-steps", "2", "--out", out])
    assert str(again.value.code) == (f"--out {out} holds a demo (warmup/, coldstart/, aepo/, grpo/): add --overwrite "
                                     "to run it again there, or choose another --out")
    with pytest.raises(SystemExit) as resumed:
        ares.main(["--demo-steps", "2", "--out", out, "--resume"])
    assert str(resumed.value.code).startswith("--resume: the demo does not continue a stopped demo; run it again with "
                                              "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # the README's opening table (`eval.py --demo` over runs; here the same run twice): every level of both decodings,
    # and the trace styles at T = 1, whose cold-start share of re-checks on easy problems is counted here again
    summary = run_script(["eval.py", "--demo", out, "--demo", out]).stdout
    for head in ("greedy, 2 seeds", "T = 1, mean@4, 2 seeds", "trace styles at T = 1", "per seed and level",
                 "response tokens, sd per level", "groups per online bucket (ARES, first half of the steps)"):
        assert head in summary, head
    spread = summary.split("response tokens, sd per level")[1].splitlines()
    hard = next(x for x in spread if x.startswith("hard: "))  # greedy | T = 1; the same run twice: its own sd
    assert hard.split(" | ")[1] == " / ".join(
        f"{report['sampled']['metrics']['test'][m]['buckets']['hard']['sd_tokens']:.1f}" for m in MODELS), hard
    easy = {r["id"] for r in read_jsonl(data / "test.jsonl") if r["difficulty"] == "easy"}
    cold = [r for r in read_jsonl(out / "eval_sampled" / "responses.jsonl") if r["model"] == "cold start" and r["id"] in easy]
    share = sum(" again:" in r["response"].split("</think>")[0] for r in cold) / len(cold)
    row = [line for line in summary.splitlines() if line.startswith("easy | ")][-1]  # the styles table's
    assert row.split(" | ")[3].split(" / ")[0].startswith(f"{100 * share:.0f}%"), row
    # each seed's tokens per level, and each seed's hard-bucket share (the "in every seed" criteria)
    tokens = summary.split("per seed and level, response tokens")[1].splitlines()
    hard_tokens = next(x for x in tokens if x.startswith(f"hard, {out}: "))
    assert hard_tokens.split(": ", 1)[1] == " | ".join(" -> ".join(
        f"{report[mode]['metrics']['test'][m]['buckets']['hard']['mean_tokens']:.1f}" for m in MODELS[:2]) +
        f" ({report[mode]['metrics']['test']['GRPO']['buckets']['hard']['mean_tokens']:.1f})" for mode in ("greedy", "sampled"))
    first = summary.split("(ARES, first half of the steps)")[1].splitlines()
    hard_share = f"{100 * report['buckets_first_half']['hard']['hard']:.0f}"
    assert next(x for x in first if x.startswith("hard: ")).endswith(f"(hard, per seed: {hard_share}%, {hard_share}%)")
    # a run whose hard level drew no group in the first half of its steps (shares None) reads n/a, not a TypeError;
    # a folder without demo.json is one line
    other = tmp_path / "other"
    for part in ("data/test.jsonl", "eval_sampled/responses.jsonl"):
        (other / part).parent.mkdir(parents=True, exist_ok=True)
        (other / part).write_bytes((out / part).read_bytes())
    report["buckets_first_half"]["hard"] = dict.fromkeys(ares.BUCKETS)
    (other / "demo.json").write_text(json.dumps(report))
    summary = run_script(["eval.py", "--demo", out, "--demo", other]).stdout
    first = summary.split("(ARES, first half of the steps)")[1].splitlines()
    assert next(x for x in first if x.startswith("hard: ")).endswith(f"(hard, per seed: {hard_share}%, n/a)")
    # a run of a demo task with other levels: one line naming both runs' levels (it was "not the report of a finished
    # run: KeyError: 'hard'", a run that had finished)
    levels = list(report["greedy"]["metrics"]["test"]["cold start"]["buckets"])
    for mode in ("greedy", "sampled"):
        for m in report[mode]["metrics"]["test"].values():
            del m["buckets"]["hard"]
    (other / "demo.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit) as mixed:
        importlib.import_module("eval").main(["--demo", str(out), "--demo", str(other)])
    assert str(mixed.value.code) == (f"--demo {other}: its levels ({', '.join(lv for lv in levels if lv != 'hard')}) are "
                                     f"not those of {out} ({', '.join(levels)}): the table averages runs of one demo task")
    with pytest.raises(SystemExit) as missing:
        importlib.import_module("eval").main(["--demo", str(out), "--demo", str(data)])
    assert str(missing.value.code) == f"--demo {data}: no demo.json in it; give the --out folder of a finished `python ares.py` run"


@pytest.mark.parametrize("flags, message", [
    (["--model", "tiny"], "--model: the demo sets it itself"),  # it used to be ignored, silently
    (["--steps", "3"], "--steps: the demo sets it itself"),
    (["--epochs", "2"], "--epochs: the demo sets it itself"),
    (["--preset", "geometry3k"], "--preset: the demo sets it itself"),
    (["--data", __file__], "--data: the demo sets it itself"),  # README (bad input): all six of DEMO_SETS
    (["--split", "test"], "--split: the demo sets it itself"),
    # a bad pair for AEPO stopped the demo only at its AEPO stage, minutes in, with torchrun's traceback
    (["--group-size", "2", "--branch-samples", "5"], "--branch-samples must be in [0, group size 2), got 5"),
    (["--lr", "1e-3", "--grader-timeout", "1e10"], "--grader-timeout must be in (0, 3600]"),
])
def test_a_flag_the_demo_sets_itself_or_a_bad_stage_flag_stops_it_before_it_writes(flags, message, tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as err:
        ares.main(["--demo-steps", "1", "--out", out, *flags])
    assert str(err.value.code).startswith(message) and "\n" not in str(err.value.code), err.value.code
    assert not out.exists()


def test_the_demo_passes_each_flag_to_the_stage_that_reads_it():
    """An AEPO flag given to the demo goes to its two AEPO runs, not to the warm-up and cold start (where it stops the
    run: a flag that would do nothing there); a flag of both stages goes to all four."""
    cfg = ares.parse_config(["--kl-coef", "0.05", "--batch-size", "8", "--trigger-words", "--out", "x"])
    assert ares.demo_flags(cfg, "coldstart") == ["--batch-size", "8"]
    assert ares.demo_flags(cfg, "aepo") == ["--batch-size", "8", "--kl-coef", "0.05", "--trigger-words"]


def demo_commands(flags, tmp_path, monkeypatch) -> tuple[list[tuple[list[str], str, int]], list[int]]:
    """The commands `python ares.py <flags>` runs, in order: (args, log, processes), recorded, not run; and how many
    had started each time the demo waited for its stage to end (so side by side: two started before one wait)."""
    commands, waits = [], []

    def record(args, procs, log, nproc=1):
        commands.append(([str(a) for a in args], str(log), nproc))
        log.write_text("")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ares, "demo_command", record)
    monkeypatch.setattr(ares, "demo_wait", lambda procs: waits.append(len(commands)))
    ares.run_demo(ares.parse_config(flags))
    return commands, waits


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_demo_stage_tables_commands_are_run_demos(tmp_path, monkeypatch, capsys):
    """README "What `python ares.py` does": the stage table abbreviates the commands run_demo runs, one row per stage in
    their order (two commands where it says twice), each of them under torchrun with 2 processes where its row says so,
    its output in runs/ares/<stage>.log; every word of a row is in its command (a flag with its value), and each
    whole command passes its program's flag checks. And what the section says of them: both AEPO runs get DEMO_AEPO,
    `--keep-uniform-groups --trigger-words`, from the same cold start, seed and steps, GRPO BASELINE's flags too; the
    sizes (DEMO) and steps (DEMO_STEPS) as stated; `--demo-steps N` N AEPO steps, 5N warm-up and cold-start steps, a
    smaller task."""
    import shlex

    from conftest import ROOT, accepts, stand_ins_for

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What `python ares.py` does"):readme.index("### The demo's tables")]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "`" in line.split(" | ")[1]]
    assert ares.parse_config([]).stage == "demo"  # "With no arguments `ares.py` runs `--stage demo`"
    commands, waits = demo_commands([], tmp_path, monkeypatch)
    small, _ = demo_commands(["--demo-steps", "3", "--out", "small"], tmp_path, monkeypatch)
    assert sum(2 if "twice" in row[1] else 1 for row in rows) == len(commands) == 10, [c[0][:2] for c in commands]
    done, stages = 0, []
    for row in rows:
        words = shlex.split(row[1].split("`")[1])
        launch = words[:2] if words[0] == "torchrun" else []  # torchrun --nproc_per_node=2
        words, nproc = words[len(launch):], int(launch[1].split("=")[1]) if launch else 1
        for args, log, ranks in commands[done:done + (2 if "twice" in row[1] else 1)]:
            assert (args[0], ranks, Path(log).parent) == (words[0], nproc, Path("runs/ares")), (row[0], args)
            for i, word in enumerate(words[1:], 1):
                assert word in args and (word.startswith("--") or args[args.index(words[i - 1]) + 1] == word), (
                    row[0], word, args)
        done += 2 if "twice" in row[1] else 1
        stages.append(done)
    assert waits == stages  # "twice, side by side": both started before the demo waits for them
    # what the rows say the commands read: the warm-up on the demo's sft traces, the pass rates of the base model on the
    # pool, AdaCS from the pool's teacher traces and those rates, the cold start from the base model on AdaCS's traces,
    # both AEPO runs from the cold start on the RL prompts, the three checkpoints on the held-out records, greedy (the
    # default) and at T = 1, mean@4
    data, warm, cold = "runs/ares/data", "runs/ares/warmup/final", "runs/ares/coldstart/final"
    reads = [{(f, flag_value(args, f)) for f in ("--model", "--data", "--pass-rates") if f in args}
             for args, _, _ in commands]
    assert reads[1:7] == [{("--model", "tiny"), ("--data", f"{data}/sft.jsonl")},
                          {("--model", warm), ("--data", f"{data}/pool.jsonl")},
                          {("--data", f"{data}/pool_traces.jsonl"), ("--pass-rates", f"{data}/pass_rates.jsonl"),
                           ("--model", "tiny")},  # (the tokenizer that counts the traces' tokens)
                          {("--model", warm), ("--data", f"{data}/adacs.jsonl")},
                          {("--model", cold), ("--data", f"{data}/rl.jsonl")},
                          {("--model", cold), ("--data", f"{data}/rl.jsonl")}]
    greedy, sampled = commands[7][0], commands[8][0]
    models = [v for f, v in zip(greedy, greedy[1:]) if f == "--model"]
    assert models == [cold, "runs/ares/aepo/final", "runs/ares/grpo/final"]
    assert flag_value(greedy, "--data") == f"{data}/test.jsonl" and "--temperature" not in greedy
    assert ev.EvalConfig().temperature == 0  # greedy
    assert sampled[:len(greedy) - 2] == greedy[:-2] and (flag_value(sampled, "--temperature"), flag_value(
        sampled, "--samples")) == ("1.0", "4")
    for args, _, _ in commands:  # the whole commands: flags that exist, values allowed, a valid combination
        stand_ins_for(args)
        accepts(args, monkeypatch)
    capsys.readouterr()
    said = " ".join(section.split())
    assert "(`DEMO_AEPO` in `ares.py`): `--keep-uniform-groups` and `--trigger-words`" in said
    assert ares.DEMO_AEPO == ["--keep-uniform-groups", "--trigger-words"]
    assert f"plain GRPO (`{shlex.join(ares.BASELINE)}`: reward = accuracy" in said
    ares_run, grpo_run = (args for args, _, _ in commands if args[:3] == ["ares.py", "--stage", "aepo"])
    assert ares_run[-len(ares.DEMO_AEPO) - 2:-2] == ares.DEMO_AEPO and "--entropy-shaping" not in ares_run
    assert grpo_run == [*ares_run[:-2], *ares.BASELINE, "--out", "runs/ares/grpo"]
    assert ("Sizes (`DEMO`: 16,000 warm-up, 1,200 pool, 1,000 RL and 300 test problems) and steps (`DEMO_STEPS`: "
            "warm-up 800, cold start 300, AEPO 100) are constants of `ares.py`") in said
    assert ares.DEMO == dict(sft=16000, pool=1200, rl=1000, test=300)
    assert ares.DEMO_STEPS == dict(warmup=800, coldstart=300, aepo=100)

    def sizes_and_steps(commands):
        data = commands[0][0]
        return ({k: int(flag_value(data, f"--{k}")) for k in ("sft", "pool", "rl", "test")},
                [int(flag_value(args, "--steps")) for args, _, _ in commands if args[0] == "ares.py"])

    assert sizes_and_steps(commands) == (ares.DEMO, [800, 300, 100, 100])
    assert "`--demo-steps N` shrinks it (N AEPO steps, 5N warm-up and cold-start steps, a small task)" in said
    sizes, steps = sizes_and_steps(small)
    assert steps == [15, 15, 3, 3] and all(sizes[k] < ares.DEMO[k] for k in sizes), sizes
