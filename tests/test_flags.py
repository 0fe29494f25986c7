"""Flags through the command line: one the user gives always wins over the stage and tiny-model defaults, even when its
value equals the dataclass default (issue 12: it used to read as "not given"), and each AEPO knob reaches the function
of Part 1 that uses it, or (--format-weight, --log-samples-every) shows in the run's log."""
import json
import math
import re
import shlex

import pytest
import torch

import ares
from conftest import ROOT, accepts, stand_ins_for


@pytest.fixture(autouse=True)
def data_file(tmp_path, monkeypatch):
    """--data x.jsonl must exist: parse_config checks the paths (issue 15) before anything loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text("")


@pytest.mark.parametrize("flags, field, expected", [
    (["--window", "4"], "window", 4),                      # 4 is the dataclass default; tiny AEPO's default is 1
    ([], "window", 1),                                     # not given: the tiny AEPO default
    (["--max-prompt-len", "4096"], "max_prompt_len", 4096),  # dataclass default; tiny default 256
    ([], "max_prompt_len", 256),
])
def test_an_explicit_flag_wins_even_when_it_equals_the_dataclass_default(flags, field, expected):
    cfg = ares.parse_config(["--model", "tiny", "--stage", "aepo", "--data", "x.jsonl", *flags])
    assert getattr(ares.resolve_stage_defaults(cfg, "aepo"), field) == expected


def test_stage_defaults_fill_what_was_not_given_and_a_caller_set_value_still_wins(full_size_model):
    cfg = ares.parse_config(["--model", "tiny", "--stage", "aepo", "--data", "x.jsonl", "--lr", "0.001"])
    assert cfg.given == ("data", "lr", "model", "stage")
    aepo = ares.resolve_stage_defaults(cfg, "aepo")
    assert (aepo.lr, aepo.window, aepo.batch_size, aepo.steps) == (1e-3, 1, 16, 150)  # lr given, the rest tiny AEPO
    cold = ares.resolve_stage_defaults(ares.Config(model="tiny", steps=7), "coldstart")  # a programmatic value
    assert (cold.steps, cold.lr, cold.window) == (7, 2e-3, 4)
    paper = ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x", "--stage",
                                                           "aepo", "--lr", "1e-6"]), "aepo")
    assert (paper.lr, paper.batch_size, paper.window, paper.max_prompt_len) == (1e-6, 512, 4, 4096)


# Each AEPO knob below, given through the command line with a value other than its default, must reach the function of
# Part 1 that uses it: the math tests call those functions with values directly, so only this checks the wiring.
KNOBS = {  # flag: (value, the function, its parameter)
    "--window": (2, "window_entropy", "w"),
    "--entropy-quantile": (0.9, "hwe_threshold", "q"),
    "--max-branches-per-response": (1, "choose_branch_points", "max_per_response"),
    "--target-momentum": (0.7, "update_targets", "momentum"),
    "--entropy-shaping": ("incorrect-only", "entropy_shaped_reward", "mode"),
    "--entropy-coef": (0.3, "entropy_shaped_reward", "alpha"),
    "--kl-coef": (0.02, "kl_weights", "beta0"),
    "--kl-relax": (0.25, "kl_weights", "relax"),
    "--kl-target": (0.02, "update_kl_controller", "target"),
    "--kl-adapt-rate": (0.1, "update_kl_controller", "rate"),
    "--clip-low": (0.15, "aepo_loss", "clip_low"),
    "--clip-high": (0.25, "aepo_loss", "clip_high"),
    "--dual-clip": (2.5, "aepo_loss", "dual_clip"),
    "--loss-agg": ("token-mean", "aepo_loss", "agg"),
    "--adv-norm": ("mean", "grpo_advantages", "std"),  # its value reaches the function as std=False: checked below
    "--temperature": (0.9, "sample_token", "temperature"),
    "--top-p": (0.95, "sample_token", "top_p"),
}


def test_every_aepo_knob_given_on_the_command_line_reaches_the_function_that_uses_it(tiny_ckpt, demo_data, tmp_path,
                                                                                      monkeypatch):
    import inspect

    import torch

    calls = {}
    for name in {fn for _, fn, _ in KNOBS.values()} | {"hwe_mask"}:
        real = getattr(ares, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.setdefault(_name, []).append(inspect.signature(_real).bind(*args, **kw).arguments)
            return _real(*args, **kw)

        monkeypatch.setattr(ares, name, spy)
    adamw, real_adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: adamw.append(kw) or real_adamw(params, **kw))
    steps = []
    real_step = ares.optimizer_step
    monkeypatch.setattr(ares, "optimizer_step", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    flags = [str(x) for flag, (value, _, _) in KNOBS.items() for x in (flag, value)]
    ares.main(["--stage", "aepo", "--model", tiny_ckpt, "--data", demo_data["rl"], "--out", tmp_path / "run", "--steps",
               1, "--batch-size", 2, "--group-size", 4, "--branch-samples", 2, "--max-response-len", 12,
               "--log-samples-every", 0, "--keep-uniform-groups", "--weight-decay", 0.05, "--ppo-epochs", 2,
               "--trigger-words", *flags])
    for flag, (value, fn, param) in KNOBS.items():
        assert calls.get(fn), f"{fn} was never called"
        want = {value != "mean"} if flag == "--adv-norm" else {value}  # mean: std=False
        assert {c[param] for c in calls[fn]} == want, (flag, {c[param] for c in calls[fn]})
    assert [kw["weight_decay"] for kw in adamw] == [0.05]
    # --trigger-words: every HWE mask (branch points and N_HE) keeps only windows that start at a reasoning word,
    # judged on the token sampled there; the table, rebuilt here from the tokenizer, marks exactly those words
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    words = {v for v in range(len(tok)) if tok.decode([v]).strip().lower() in ares.TRIGGER_WORDS}
    assert words and calls["hwe_mask"]
    for c in calls["hwe_mask"]:
        assert c["tokens"] is not None and set(c["triggers"].nonzero().flatten().tolist()) == words
    assert len(steps) == 2  # --ppo-epochs 2: two passes over the one rollout batch (one minibatch each)


def test_the_cold_starts_default_warm_up_is_3_percent_of_its_steps(full_size_model):
    """README (paper settings): without --warmup-steps a cold start of a real model warms up over 3% of its optimizer
    steps (at least 1), then decays by cosine to 10%; the tiny model's defaults set 20. Worked out by hand for 200
    steps: warm-up 6, the rate at step k < 6 is (k + 1) / 6 of --lr, and 1e-5 of 1e-5 at step 6."""
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x.jsonl", "--stage",
                                                         "coldstart", "--lr", "1e-5"]), "coldstart")
    assert cfg.warmup_steps is None
    p = torch.nn.Parameter(torch.zeros(1))
    _, sched = ares.make_optimizer([p], cfg, 200)
    rates = []
    for _ in range(8):
        rates.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert rates == pytest.approx([1e-5 * (k + 1) / 6 for k in range(6)] + [1e-5, 1e-5 * (0.1 + 0.45 * (1 + math.cos(math.pi / 194)))])
    assert ares.make_optimizer([p], cfg, 10)[1].lr_lambdas[0].plan["warm"] == 1  # 3% of 10 rounds to 0: at least 1
    tiny = ares.resolve_stage_defaults(ares.parse_config(["--model", "tiny", "--data", "x.jsonl", "--stage", "coldstart"]),
                                       "coldstart")
    assert ares.make_optimizer([p], tiny, 200)[1].lr_lambdas[0].plan["warm"] == 20


def test_format_weight_adds_its_share_of_formatted_responses_to_the_reward_and_log_samples_every_prints(
        tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    """--format-weight w: R = the score + w for a response in the <think>..</think> \\boxed{} format. The tiny model
    never writes one, so here a response 'is formatted' when its text has an even length; a hook scoring 0 and
    --entropy-shaping none leave R = w * formatted, whose step mean is w * the logged format share. And
    --log-samples-every 2 prints a sample at step 2 alone."""
    (tmp_path / "hook.py").write_text("def score(record, response):\n    return 0.0\n")
    monkeypatch.setattr(ares, "format_ok", lambda text: len(text) % 2 == 0)
    ares.main(["--stage", "aepo", "--model", tiny_ckpt, "--data", demo_data["rl"], "--out", tmp_path / "run",
               "--steps", 3, "--batch-size", 2, "--group-size", 4, "--max-response-len", 12, "--keep-uniform-groups",
               "--format-weight", 0.5, "--entropy-shaping", "none", "--reward-fn", f"{tmp_path / 'hook.py'}:score",
               "--log-samples-every", 2])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(0 < r["format"] < 1 for r in rows)
    assert [r["reward"] for r in rows] == pytest.approx([0.5 * r["format"] for r in rows], rel=1e-12)
    printed = capsys.readouterr().out
    assert "\n[step 2] answer " in printed and "[step 1]" not in printed and "[step 3]" not in printed


@pytest.mark.parametrize("tool, argv", [("data_prep", ["--help"]), ("data_prep", ["convert", "--help"]),
                                        ("data_prep", ["adacs", "--help"]), ("data_prep", ["demo", "--help"]),
                                        ("bench", ["--help"])])
def test_data_prep_its_subcommands_and_bench_each_have_a_help(tool, argv, capsys):
    """README (flags): data_prep.py, eval.py and bench.py each have --help, and data_prep.py SUBCOMMAND --help
    (eval.py's are in test_eval.py): each prints its usage and exits 0."""
    import importlib

    with pytest.raises(SystemExit) as err:
        importlib.import_module(tool).main(argv)
    printed = capsys.readouterr().out  # "usage: <the program's name>[ SUBCOMMAND] [-h] ...", then every flag
    first = printed.split("\n")[0].split()
    assert err.value.code == 0 and first[0] == "usage:", printed[:200]
    assert first[2:2 + len(argv)] == [*argv[:-1], "[-h]"], printed[:200]
    assert "-h, --help" in printed


# README "Paper settings" and ARES_SPEC.md sections 7 and 8, written out by hand from the paper (not read from
# STAGE_DEFAULTS, which is what they check): what a real model's stage runs with when no flag is given.
PAPER_AEPO = dict(batch_size=512, group_size=8, temperature=1.0, top_p=0.99,  # 512 prompts x G = 8
                  max_prompt_len=4096, max_response_len=16384,  # 4k + 16k tokens
                  lr=1e-6, weight_decay=1e-2, warmup_steps=0, lr_schedule="constant",
                  grad_clip=1.0, minibatches=4, ppo_epochs=1, steps=250, window=4, entropy_quantile=0.95,
                  train_vision=False)
PAPER_COLDSTART = dict(epochs=2, steps=None, batch_size=256, lr=2e-5, train_vision=False, max_prompt_len=4096,
                       max_response_len=16384)  # steps None: the length is --epochs
AUTHORS_SUFFIX = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
                  "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
                  "BE put in \\boxed{}.")


@pytest.mark.parametrize("stage, paper", [("aepo", PAPER_AEPO), ("coldstart", PAPER_COLDSTART)])
def test_a_real_models_stage_defaults_are_the_papers_settings(stage, paper, full_size_model):
    """README (paper settings): with no flag given, each stage of a model that is not the tiny one runs with the
    paper's numbers and the authors' prompt suffix, and the README quotes that suffix word for word."""
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x.jsonl", "--stage",
                                                         stage]), stage)
    assert {k: getattr(cfg, k) for k in paper} == paper
    assert cfg.prompt_suffix == AUTHORS_SUFFIX
    from conftest import ROOT

    section = (ROOT / "README.md").read_text().split("\n### Paper settings\n")[1].split("\n## ")[0]
    assert AUTHORS_SUFFIX in " ".join(section.split())


# README "Choices we made where the paper is ambiguous": "Each is the default". The table's values, written out by
# hand from the table (and ARES_SPEC.md), against what a real model's AEPO stage resolves to with no flag given.
CHOICES = dict(window=4, entropy_quantile=0.95, trigger_words=False,  # window [t, t+w-1], w = 4; tau's 0.95 quantile
               group_size=8, branch_samples=4, max_branches_per_response=2,  # B = G/2, at most 2 per parent
               target_momentum=0.9, entropy_shaping="hierarchical", entropy_coef=0.4,  # T_d's EMA; alpha 0.4
               kl_mode="dynamic", kl_relax=0.5, kl_target=0.01, kl_adapt_rate=0.05,  # rho 0.5, target 0.01, rate 0.05
               clip_low=0.2, clip_high=0.3, dual_clip=3.0, loss_agg="seq-mean-token-mean",  # as released; Eq. 2
               group_filter="accuracy", keep_uniform_groups=False, max_refill_rounds=0,  # refill off
               top_p=0.99, format_weight=0.0)  # the nucleus the sampler draws from; the format reward logged only


def test_the_choices_tables_values_are_the_defaults(full_size_model):
    cfg = ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x.jsonl", "--stage",
                                                         "aepo"]), "aepo")
    assert {k: getattr(cfg, k) for k in CHOICES} == CHOICES
    assert ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x.jsonl", "--stage",
                                                          "aepo", "--group-size", "6"]), "aepo").branch_samples == 3
    cold = ares.resolve_stage_defaults(ares.parse_config(["--model", full_size_model, "--data", "x.jsonl", "--stage",
                                                          "coldstart"]), "coldstart")
    assert (cold.lr_schedule, cold.warmup_steps) == ("cosine", None)  # None: 3% of the steps (test above)


def test_the_tiny_models_own_defaults_are_the_readmes():
    """README (choices, the tiny model): --window 1 in AEPO, a constant learning rate in the cold start,
    --max-response-len 128 in both stages and no answer-format instruction; a flag given still wins."""
    def tiny(stage, *flags):
        return ares.resolve_stage_defaults(ares.parse_config(["--model", "tiny", "--data", "x.jsonl", "--stage", stage,
                                                              *flags]), stage)

    aepo, cold = tiny("aepo"), tiny("coldstart")
    assert (aepo.window, aepo.max_response_len, aepo.prompt_suffix) == (1, 128, "")
    assert (cold.lr_schedule, cold.max_response_len, cold.prompt_suffix) == ("constant", 128, "")
    assert tiny("coldstart", "--lr-schedule", "cosine").lr_schedule == "cosine"


def readme_commands(text: str) -> list[str]:
    """The commands that README text gives for ares.py, eval.py and data_prep.py, each on one line: a code block's
    `python X.py ...` and `torchrun ... X.py ...` lines (continuations joined, comments cut), and the same in
    backticks, where a bare `X.py --flag value ...` of four words or more is a command too (shorter ones name a
    program, a subcommand or a flag; one with `...` leaves flags out)."""
    program = r"\b(ares|eval|data_prep)\.py\b"
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.match(r"(python|torchrun)\b", line) and re.search(program, line):
                commands.append(" ".join(line.split()))
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split())
        if re.match(r"(python|torchrun)\b", span) and re.search(program, span) or \
                re.match(program, span) and len(span.split()) >= 4 and "..." not in span and ":" not in span:
            commands.append(span)
    return commands


# README "Where the hard points go": the ablations' `<flags>`, row by row (the README's words, whitespace aside, then
# the flags added to the ARES command and those taken out of it)
ABLATIONS = [
    ("`<flags>` = `BASELINE` is its GRPO run", ares.BASELINE, []),
    ("(`--entropy-shaping none`: branching", ["--entropy-shaping", "none"], []),
    ("(`--group-filter reward` in place of `--keep-uniform-groups`)", ["--group-filter", "reward"],
     ["--keep-uniform-groups"]),
    ("(`BASELINE` without `--keep-uniform-groups`;", ares.BASELINE, ["--keep-uniform-groups"]),
    ("no branching (`--branch-samples 0`)", ["--branch-samples", "0"], []),
    ("reward (`--entropy-shaping incorrect-only`)", ["--entropy-shaping", "incorrect-only"], []),
    ("no `--trigger-words` 38.5", [], ["--trigger-words"]),
    ("the paper's filter with the released code's `--entropy-coef 0.5`", ["--group-filter", "reward",
                                                                          "--entropy-coef", "0.5"],
     ["--keep-uniform-groups"]),
    ("the ablation commands below with `--minibatches 4` added to both runs", ["--minibatches", "4"], []),
    ("With `--steps 200` (twice the demo's)", ["--steps", "200"], []),
    ("the same AEPO commands with `--steps 200 --resume`", ["--steps", "200", "--resume"], []),
]


def test_every_command_in_the_readme_is_one_its_program_accepts(tmp_path, monkeypatch, capsys):
    """README: each command it gives for ares.py, eval.py and data_prep.py ("The real pipeline on GPUs", the several
    nodes', the memory plan's, the demo's seeds and ablations, the hub preset's, ...) parses and passes the
    program's own flag checks, its stage's included (a flag of one stage given to the other, a --group-filter reward
    beside --keep-uniform-groups, a flag the demo sets itself), so a renamed or dropped flag, a value no longer
    allowed or a combination that no longer makes sense fails here. Placeholders become stand-ins in a folder of
    their own for each command: S the seed 0, X runs/x, every --model a folder with a model's config.json, every
    --data, --pass-rates and --eval-data file an empty file (nothing is read: the checks stop before the data). The
    demo's stage table abbreviates run_demo's commands: test_the_demo_stage_tables_commands_are_run_demos."""
    import data_prep

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| stage | command |"):readme.index("It prints the tables and the time of each stage")]
    commands = readme_commands(readme.replace(table, ""))
    assert len(set(commands)) >= 25, commands
    said = " ".join(readme.split())
    ablation = next(c for c in commands if "<flags>" in c)
    for words, added, taken in ABLATIONS:
        assert words in said, words
        commands.append(" ".join(w for w in ablation.replace("<flags>", shlex.join(added)).split() if w not in taken))
    commands = [c.replace("<flags>", "") for c in commands]
    monkeypatch.setitem(data_prep.PRESETS, "yourname", dict(hub="org/name", split="train",  # "Forking": a new preset
                                                             mapping=dict(question="problem", answer="solution")))
    stand_ins = {"<3B cold start>": "runs/coldstart/final", "<7B cold start>": "runs/coldstart/final",
                 "<rl data>": "data/rl.jsonl", "<out>": "runs/aepo", "/shared/": "shared/", "seedS": "seed0",
                 "S": "0", "X": "runs/x"}
    refused, checked = refusals(commands, stand_ins, tmp_path, monkeypatch, capsys)
    assert not refused, "\n".join(f"README: {line}" for line in refused)
    assert checked == {"ares.py", "eval.py", "data_prep.py"}


@pytest.mark.parametrize("module", ["ares", "eval", "data_prep"])
def test_every_command_in_a_module_docstring_is_one_its_program_accepts(module, tmp_path, monkeypatch, capsys):
    """The module docstrings' launch commands (where a reader of the file starts) pass the same checks as the
    README's: A, B and M stand for checkpoints; `[--fsdp]` is given; a command with `...` leaves flags out."""
    import importlib

    doc = importlib.import_module(module).__doc__
    commands = [c.replace("[--fsdp]", "--fsdp").replace("SUBCOMMAND", "convert")
                for c in readme_commands(f"```\n{doc}```") if "..." not in c]
    assert len(commands) >= 5, commands
    refused, _ = refusals(commands, {"A": "runs/a", "B": "runs/b", "M": "runs/m"}, tmp_path, monkeypatch, capsys)
    assert not refused, "\n".join(f"{module}.py's docstring: {line}" for line in refused)


def refusals(commands: list[str], stand_ins: dict, tmp_path, monkeypatch, capsys) -> tuple[list[str], set]:
    """Each command through `accepts` in a folder of its own, its placeholders replaced by `stand_ins` (in their order;
    a one-letter one as a word of its own) and the files its flags name made there (stand_ins_for): the commands
    refused, each with its program's line, and the programs checked."""
    refused, checked = [], set()
    for n, command in enumerate(sorted(set(commands))):
        line = command
        for placeholder, value in stand_ins.items():
            line = re.sub(rf"\b{placeholder}\b", value, line) if len(placeholder) == 1 else line.replace(placeholder,
                                                                                                        value)
        words = shlex.split(line)
        start = next(i for i, w in enumerate(words) if re.fullmatch(r"(ares|eval|data_prep)\.py", w))
        argv = words[start:]  # the program and its flags, after python's or torchrun's own
        assert "<" not in " ".join(argv), f"a placeholder without a stand-in: {command}"
        (tmp_path / f"command{n}").mkdir()
        monkeypatch.chdir(tmp_path / f"command{n}")
        stand_ins_for(argv)
        try:
            accepts(argv, monkeypatch)
        except SystemExit as stop:
            refused.append(f"{command}\n  stops: {stop.code} {capsys.readouterr().err.strip()}")
        capsys.readouterr()
        checked.add(argv[0])
    return refused, checked


def test_a_reward_fn_given_with_a_tilde_is_the_home_folders_file(tmp_path, monkeypatch):
    """--reward-fn=~/hook.py:score (a shell expands no ~ after '='), as --out and --data: the file was looked for under
    a folder named '~' (`--reward-fn ~/hook.py:score: no such file ~/hook.py`). Now it is $HOME's, and the flag holds
    that path."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "hook.py").write_text("def score(record, response):\n    return 1.0\n")
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = ares.parse_config(["--stage", "aepo", "--model", "tiny", "--data", str(data), "--out", "run",
                             "--reward-fn=~/hook.py:score"])
    assert cfg.reward_fn == f"{home / 'hook.py'}:score"


def test_a_ref_model_and_eval_data_given_with_a_tilde_are_the_home_folders(tmp_path, tiny_ckpt, monkeypatch):
    """--ref-model=~/ref and --eval-data=~/held.jsonl (a shell expands no ~ after '='), as --model and --data: their
    checks read $HOME's path, and the loaders must too (they took '~/ref' for a hub name, '~/held.jsonl' for a data
    set's). The flags hold the home folder's paths, written out here by hand."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ref").symlink_to(tiny_ckpt)
    row = json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n"
    (home / "held.jsonl").write_text(row)
    (tmp_path / "rl.jsonl").write_text(row)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = ares.parse_config(["--stage", "aepo", "--model", "tiny", "--data", "rl.jsonl", "--out", "run",
                             "--ref-model=~/ref", "--eval-data=~/held.jsonl"])
    assert (cfg.ref_model, cfg.eval_data) == (f"{tmp_path}/home/ref", f"{tmp_path}/home/held.jsonl")
