"""Every bad flag or input record stops before anything loads, with one line naming the flag (and its allowed
values) or the file, record and field; logs survive a kill; the grader is bounded in time wherever it runs.
One case per defect of issue 15, each a row of a table."""
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_until_first_step_save
from PIL import Image
from test_math import GRADING

import ares

# ----------------------------------------------------------------------------------------------------------
# Flags: (stage, flags, what the one-line error must say). {tmp} is the test's folder.
FLAGS = [
    ("coldstart", ["--batch-size", "-8"], "--batch-size must be >= 1, got -8"),
    ("coldstart", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("coldstart", ["--micro-batch-size", "-1"], "--micro-batch-size must be >= 1, got -1"),
    ("coldstart", ["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    ("aepo", ["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    ("aepo", ["--rollout-batch", "0"], "--rollout-batch must be >= 1, got 0"),
    ("aepo", ["--minibatches", "0"], "--minibatches must be >= 1, got 0"),
    ("aepo", ["--ppo-epochs", "0"], "--ppo-epochs must be >= 1, got 0"),
    ("coldstart", ["--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),
    ("coldstart", ["--grad-clip", "0"], "--grad-clip must be > 0, got 0.0"),
    ("aepo", ["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    ("aepo", ["--temperature", "-0.5"], "--temperature must be > 0, got -0.5"),
    ("coldstart", ["--lr", "-1"], "--lr must be > 0, got -1.0"),
    ("coldstart", ["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    ("aepo", ["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    ("coldstart", ["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    ("coldstart", ["--keep-last", "-1"], "--keep-last must be >= 1, got -1"),
    ("coldstart", ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    ("coldstart", ["--save-every", "-1"], "--save-every must be >= 1, got -1"),
    ("coldstart", ["--steps", "0"], "--steps must be >= 1, got 0 (leave --steps out to train for --epochs)"),
    ("coldstart", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("aepo", ["--grader-timeout", "0"], "--grader-timeout must be > 0, got 0.0"),
    ("aepo", ["--grader-workers", "-1"], "--grader-workers must be >= 0, got -1"),
    ("aepo", ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("aepo", ["--group-size", "1"], "--group-size must be >= 2, got 1"),
    ("aepo", ["--kl-coef", "-0.1"], "--kl-coef must be >= 0, got -0.1"),
    ("aepo", ["--entropy-coef", "nan"], "--entropy-coef must be >= 0 and finite, got nan"),
    ("aepo", ["--format-weight", "nan"], "--format-weight must be finite, got nan"),
    ("aepo", ["--dual-clip", "1"], "--dual-clip must be > 1, got 1.0"),
    ("coldstart", ["--max-pixels", "100", "--min-pixels", "200"], "--max-pixels must be >= --min-pixels, got 100"),
    ("coldstart", ["--model", "{tmp}/no/such/model"], "--model {tmp}/no/such/model: no such folder"),
    ("coldstart", ["--model", "{tmp}"], "--model {tmp}: not a model folder (it has no config.json)"),
    ("aepo", ["--ref-model", "{tmp}/no_such_ref"], "--ref-model {tmp}/no_such_ref: no such folder"),
    ("coldstart", ["--out", "{tmp}/a_file"], "--out {tmp}/a_file: {tmp}/a_file is a file, not a folder"),
    ("coldstart", ["--out", "{tmp}/a_file/run"], "--out {tmp}/a_file/run: {tmp}/a_file is a file, not a folder"),
    ("coldstart", ["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file or folder"),
    ("aepo", ["--data", "{tmp}/missing/folder"], "--data {tmp}/missing/folder: no such file or folder"),
]


@pytest.mark.parametrize("stage, flags, message", FLAGS, ids=[" ".join(f[:2]) + f" ({s})" for s, f, _ in FLAGS])
def test_bad_flag_stops_with_one_line_naming_the_flag(stage, flags, message, tiny_ckpt, demo_data, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    data = demo_data["sft" if stage == "coldstart" else "rl"]
    out = tmp_path / "out"
    args = ["--stage", stage, "--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--steps", "1",
            "--batch-size", "2", *[f.format(tmp=tmp_path) for f in flags]]
    with pytest.raises(SystemExit) as err:
        ares.main(args)
    msg = str(err.value.code)
    assert msg.startswith(message.format(tmp=tmp_path)) and "\n" not in msg, msg
    assert not out.exists()  # nothing was loaded, trained or written


def test_stage_defaults_are_validated_when_the_stage_starts(tiny_ckpt, demo_data, tmp_path):
    """What parse_config did not see (a caller's own Config, as the demo builds) is checked after the stage
    defaults are filled in, before the data or the model is read."""
    cfg = ares.Config(stage="aepo", model=str(tiny_ckpt), data=str(demo_data["rl"]), out=str(tmp_path / "out"))
    for stage, bad in ((ares.train_coldstart, dict(batch_size=-8)), (ares.train_aepo, dict(minibatches=0))):
        with pytest.raises(SystemExit, match=f"--{next(iter(bad)).replace('_', '-')} must be >= 1"):
            stage(ares.dataclasses.replace(cfg, **bad))
    assert not (tmp_path / "out").exists()
