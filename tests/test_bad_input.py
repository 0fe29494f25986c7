"""Every bad flag or input record stops before anything loads, with one line naming the flag (and its allowed
values) or the file, record and field; logs survive a kill; the grader is bounded in time wherever it runs.
One case per defect of issue 15, each a row of a table."""
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_until_first_step_save
from PIL import Image
from test_math import GRADING

import ares
import data_prep

# ----------------------------------------------------------------------------------------------------------
# Flags: (stage, flags, what the one-line error must say). {tmp} is the test's folder.
FLAGS = [
    ("coldstart", ["--batch-size", "-8"], "--batch-size must be >= 1, got -8"),
    ("coldstart", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("coldstart", ["--micro-batch-size", "-1"], "--micro-batch-size must be >= 1, got -1"),
    ("coldstart", ["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    ("aepo", ["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
    ("aepo", ["--rollout-batch", "0"], "--rollout-batch must be auto or an integer >= 1, got 0"),
    ("aepo", ["--minibatches", "0"], "--minibatches must be >= 1, got 0"),
    ("aepo", ["--ppo-epochs", "0"], "--ppo-epochs must be >= 1, got 0"),
    ("coldstart", ["--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),
    ("coldstart", ["--grad-clip", "0"], "--grad-clip must be > 0, got 0.0"),
    ("aepo", ["--temperature", "0"], "--temperature must be >= 0.01, got 0.0"),
    ("aepo", ["--temperature", "-0.5"], "--temperature must be >= 0.01, got -0.5"),
    ("aepo", ["--temperature", "1e-40"], "--temperature must be >= 0.01, got 1e-40"),  # z / T overflowed: NaN, every
    ("aepo", ["--temperature", "0.009"], "--temperature must be >= 0.01, got 0.009"),  # response the last token, exit 0
    ("coldstart", ["--lr", "-1"], "--lr must be > 0, got -1.0"),
    ("coldstart", ["--lr", "nan"], "--lr must be > 0 and finite, got nan"),
    ("aepo", ["--lr", "inf"], "--lr must be > 0 and finite, got inf"),
    ("coldstart", ["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    ("coldstart", ["--keep-last", "-1"], "--keep-last must be >= 1, got -1"),
    ("coldstart", ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    ("coldstart", ["--save-every", "-1"], "--save-every must be >= 1, got -1"),
    ("coldstart", ["--steps", "0"], "--steps must be >= 1, got 0 (leave --steps out to train for --epochs)"),
    ("coldstart", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("aepo", ["--grader-timeout", "0"], "--grader-timeout must be in (0, 3600], got 0.0"),
    ("aepo", ["--grader-workers", "-1"], "--grader-workers must be >= 0, got -1"),
    ("aepo", ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("aepo", ["--group-size", "1"], "--group-size must be >= 2, got 1"),
    ("aepo", ["--kl-coef", "-0.1"], "--kl-coef must be >= 0, got -0.1"),
    ("aepo", ["--entropy-coef", "nan"], "--entropy-coef must be >= 0 and finite, got nan"),
    ("aepo", ["--format-weight", "nan"], "--format-weight must be finite, got nan"),
    ("aepo", ["--dual-clip", "1"], "--dual-clip must be 0 (off) or > 1, got 1.0"),
    ("coldstart", ["--dtype", "fp16"], "--dtype fp16: training in fp16 needs loss scaling"),
    ("coldstart", ["--max-pixels", "100", "--min-pixels", "200"], "--max-pixels must be >= --min-pixels, got 100"),
    ("coldstart", ["--model", "{tmp}/no/such/model"], "--model {tmp}/no/such/model: no such folder"),
    ("coldstart", ["--model", "{tmp}"], "--model {tmp}: not a model folder (it has no config.json)"),
    ("aepo", ["--ref-model", "{tmp}/no_such_ref"], "--ref-model {tmp}/no_such_ref: no such folder"),
    ("coldstart", ["--out", "{tmp}/a_file"], "--out {tmp}/a_file: {tmp}/a_file is a file, not a folder"),
    ("coldstart", ["--out", "{tmp}/a_file/run"], "--out {tmp}/a_file/run: {tmp}/a_file is a file, not a folder"),
    ("coldstart", ["--data", "{tmp}/missing.jsonl"], "--data {tmp}/missing.jsonl: no such file or folder"),
    ("aepo", ["--data", "{tmp}/missing/folder"], "--data {tmp}/missing/folder: no such file or folder"),
    ("aepo", ["--split", "test"], "--split test: --data "),  # rl.jsonl: read whole, the split was ignored
    # found by trying them (each was a traceback, or trained on it):
    ("coldstart", ["--model", "runs/no_such_run"],  # the README's own example: taken for a hub name, two tracebacks
     "--model runs/no_such_run: no such folder, and no model of that name on the hub (or in its cache, offline)"),
    ("aepo", ["--ref-model", "no_such_org/no_such_model"],  # failed after the policy had loaded
     "--ref-model no_such_org/no_such_model: no such folder, and no model of that name on the hub"),
    ("coldstart", ["--model", ""], "--model is empty"),
    ("coldstart", ["--out", ""], "--out is empty: give a folder"),  # the run went into the working folder
    ("coldstart", ["--dist-timeout", "0"], "--dist-timeout must be >= 1, got 0"),  # a C++ trace under torchrun
    ("aepo", ["--prompt-suffix", " <|im_end|>"],  # trained with an end of turn after every question
     "--prompt-suffix contains the chat-template token '<|im_end|>'"),
    ("coldstart", ["--attn", "flash_attention_2"], "--attn flash_attention_2 needs the optional package flash-attn"),
    # past a C int or setitimer's range: an OverflowError after the model loaded, or every sympy-checked answer wrong
    ("aepo", ["--grader-timeout", "1e10"], "--grader-timeout must be in (0, 3600], got 10000000000.0"),
    ("aepo", ["--grader-timeout", "3601"], "--grader-timeout must be in (0, 3600], got 3601.0"),  # README: over 3600 s
    ("aepo", ["--group-size", "99999999999999999999"], "--group-size must be at most 2147483647, got 99999999999999999999"),
    ("aepo", ["--lora-rank", "4294967296"], "--lora-rank must be at most 2147483647, got 4294967296"),
    ("coldstart", ["--dist-timeout", "99999999999999999999"], "--dist-timeout must be at most 2147483647"),
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


@pytest.mark.parametrize("tool, argv, message", [
    ("ares", ["--lr", "abc"], "ares.py: error: argument --lr: invalid float value: 'abc'"),
    ("ares", ["--kl-mode", "foo"], "ares.py: error: argument --kl-mode: invalid choice: 'foo' (choose from 'dynamic', "
                                   "'fixed')"),
    ("eval", ["--model", "m", "--data", "d", "--samples", "two"], "eval.py: error: argument --samples: invalid int "
                                                                 "value: 'two'"),
    ("eval", ["passrate", "--data", "d", "--model", "m", "--k", "x"], "eval.py passrate: error: argument --k: invalid "
                                                                       "int value: 'x'"),
    ("data_prep", ["demo", "--sft", "x"], "data_prep.py demo: error: argument --sft: invalid int value: 'x'"),
    ("data_prep", ["nosuch"], "data_prep.py: error: argument command: invalid choice: 'nosuch'"),
    ("bench", ["--repeats", "x"], "bench.py: error: argument --repeats: invalid int value: 'x'"),
])
def test_a_flag_of_the_wrong_type_or_choice_is_one_line_not_the_whole_usage(tool, argv, message, capsys, monkeypatch):
    """argparse printed every tool's whole usage (31 lines for ares.py) above its error, where the README promises one
    line naming the flag and what it takes."""
    import importlib

    module = importlib.import_module(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py"])  # argparse names the program after it
    parse = module.parse_args if tool == "bench" else module.main
    with pytest.raises(SystemExit) as err:
        parse(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert lines[0].endswith("(--help lists every flag)"), lines

@pytest.mark.parametrize("package, found, need", [("transformers", "5.17.0", "5.24.0"), ("torch", "2.5.1", "2.6")])
def test_an_old_package_stops_with_one_line_naming_the_version_needed(package, found, need, tiny_ckpt, demo_data,
                                                                      tmp_path, monkeypatch):
    """transformers older than the pinned 5.24 (the device image has 5.17, which lacks the cache API ares uses) or a
    torch without FSDP2's fully_shard: one line naming what is needed, before anything loads."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found if name == package else real(name))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "aepo", "--model", str(tiny_ckpt), "--data", str(demo_data["rl"]), "--out", str(out)])
    assert str(err.value.code) == f"ares.py needs {package} >= {need}, found {found}: pip install '{package}>={need}'"
    assert not out.exists()


def test_stage_defaults_are_validated_when_the_stage_starts(tiny_ckpt, demo_data, tmp_path):
    """What parse_config did not see (a caller's own Config, as the demo builds) is checked after the stage
    defaults are filled in, before the data or the model is read."""
    cfg = ares.Config(stage="aepo", model=str(tiny_ckpt), data=str(demo_data["rl"]), out=str(tmp_path / "out"))
    for stage, bad in ((ares.train_coldstart, dict(batch_size=-8)), (ares.train_aepo, dict(minibatches=0))):
        with pytest.raises(SystemExit, match=f"--{next(iter(bad)).replace('_', '-')} must be >= 1"):
            stage(ares.dataclasses.replace(cfg, **bad))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Records: (name, stage, how the LAST record of a valid file is broken, words the error must contain). Each
# error is "data error: <file>: record <id>: field '<field>' ...", before any model loads.

def _rows(demo: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(demo)][:4]
    return [dict(r, images=[str(demo.parent / im) for im in r["images"]]) for r in rows]


def _set(field, value):
    return lambda row, tmp: dict(row, **{field: value})


def _append(field, text):
    return lambda row, tmp: dict(row, **{field: row[field] + text})


def _wide_image(row, tmp):
    Image.new("RGB", (300, 1), (200, 0, 0)).save(tmp / "wide.png")
    return dict(row, images=[str(tmp / "wide.png")])


RECORDS = [
    ("image pad in question", "coldstart", _append("question", " <|image_pad|>"), ["question", "<|image_pad|>"]),
    ("image pad in response", "coldstart", _append("response", " <|image_pad|>"), ["response", "<|image_pad|>"]),
    ("video pad in response", "coldstart", _append("response", "<|video_pad|>"), ["response", "<|video_pad|>"]),
    ("im_end inside a response", "coldstart", _append("response", "<|im_end|> more"), ["response", "<|im_end|>"]),
    ("im_start in the answer", "aepo", _set("answer", "<|im_start|>5"), ["answer", "<|im_start|>"]),
    ("endoftext in question", "aepo", _append("question", "<|endoftext|>"), ["question", "<|endoftext|>"]),
    ("vision_start in question", "aepo", _append("question", "<|vision_start|>"), ["question", "<|vision_start|>"]),
    ("another model's token", "aepo", _append("question", "<|eot_id|>"), ["question", "<|eot_id|>"]),
    ("answer true", "aepo", _set("answer", True), ["answer", "must be text or a finite number, got true"]),
    ("answer NaN", "aepo", _set("answer", math.nan), ["answer", "got NaN"]),
    ("answer a list", "aepo", _set("answer", [5]), ["answer", "got [5]"]),
    ("id null", "aepo", _set("id", None), ["missing or empty field 'id'"]),
    ("id missing", "aepo", lambda row, tmp: {k: v for k, v in row.items() if k != "id"}, ["missing or empty field 'id'"]),
    ("id empty", "aepo", _set("id", " "), ["missing or empty field 'id'"]),
    ("id a list", "aepo", _set("id", [3]), ["field 'id' must be text or an integer, got [3]"]),
    ("id a bool", "aepo", _set("id", True), ["field 'id' must be text or an integer, got true"]),  # was "record True"
    ("an image a number", "aepo", _set("images", [5]), ["field 'images': unsupported image type int"]),
    ("images false", "aepo", _set("images", False), ["field 'images': unsupported image type bool"]),  # were read as
    ("images 0", "aepo", _set("images", 0), ["field 'images': unsupported image type int"]),  # no image (convert refused)
    ("response 5", "coldstart", _set("response", 5), ["field 'response' must be text, got 5"]),
    # README: a missing or empty field; the cold start trains on the response (an empty one: the end of turn alone)
    ("response empty", "coldstart", _set("response", "  "), ["missing or empty field 'response'"]),
    ("response missing", "coldstart", lambda row, tmp: {k: v for k, v in row.items() if k != "response"},
     ["missing or empty field 'response'"]),
    ("answer empty", "aepo", _set("answer", ""), ["missing or empty field 'answer'"]),
    ("question 7", "aepo", _set("question", 7), ["field 'question' must be text, got 7"]),
    ("pass_rate true", "aepo", _set("pass_rate", True), ["pass_rate"]),
    ("pass_rate above 1", "aepo", _set("pass_rate", 1.5), ["field 'pass_rate' must be a number in [0, 1], got 1.5"]),
    ("difficulty a list", "aepo", _set("difficulty", ["hard"]),
     ["field 'difficulty' must be text or an integer, got [\"hard\"]"]),
    ("difficulty a float", "coldstart", _set("difficulty", 2.5), ["field 'difficulty' must be text or an integer, got 2.5"]),
    ("difficulty a bool", "aepo", _set("difficulty", True), ["field 'difficulty' must be text or an integer, got true"]),
    ("1x300 image", "coldstart", _wide_image, ["images", "300x1", "aspect ratio"]),
    ("answer an empty boxed", "aepo", _set("answer", "\\boxed{}"), ["answer", "is an empty \\boxed{}"]),
    # options: a string would be one option per letter, one option is no choice, the answer must name one of them
    ("choices a string", "aepo", _set("choices", "AB"), ["field 'choices' must be a list of 2 to 26 options", '"AB"']),
    ("one choice", "aepo", _set("choices", ["4"]), ["field 'choices' must be a list of 2 to 26 options", '["4"]']),
    ("27 choices", "aepo", _set("choices", [str(k) for k in range(27)]),  # one past Z
     ["field 'choices' must be a list of 2 to 26 options"]),
    ("an empty choice", "aepo", _set("choices", ["4", " "]), ["field 'choices'", '["4", " "]']),
    ("a choice with a chat token", "aepo", _set("choices", ["4", "<|im_end|>"]), ["field 'choices'"]),
    ("answer not an option", "aepo", lambda row, tmp: dict(row, choices=["zero", "one"]),
     ["field 'answer'", "is neither an option nor an option letter of [\"zero\", \"one\"]"]),
]


@pytest.mark.parametrize("name, stage, breaks, words", RECORDS, ids=[r[0] for r in RECORDS])
def test_bad_record_stops_before_the_model_loads_naming_file_record_and_field(name, stage, breaks, words, tiny_ckpt,
                                                                             demo_data, tmp_path):
    rows = _rows(Path(demo_data["sft"]))
    broken = breaks(rows[-1], tmp_path)
    bad = broken if name.startswith("id ") else dict(broken, id="broken-7")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1] + [bad]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", stage, "--model", str(tiny_ckpt), "--data", str(path), "--out", str(out), "--steps", "1",
                   "--batch-size", "2"])
    msg = str(err.value.code)
    record = "#3" if name.startswith("id ") else "broken-7"
    assert msg.startswith(f"data error: {path}: record {record}: ") and "\n" not in msg, msg
    assert all(w.lower() in msg.lower() for w in words), msg
    assert not out.exists()


@pytest.mark.parametrize("size", [(200, 1), (1, 200), (201, 1), (1, 201)])
def test_an_image_is_refused_exactly_where_qwen_vls_processor_refuses_it(size, tiny):
    """README (bad input): an image whose aspect ratio is over 200 is refused, because Qwen-VL's image processor refuses
    it: the same images, at 200 and 201, through the processor itself and through the records' check."""
    image = Image.new("RGB", size, (200, 0, 0))
    try:
        tiny[1].image_processor(images=[image])
        processor_takes = True
    except ValueError:
        processor_takes = False
    assert processor_takes == (max(size) <= 200)
    if processor_takes:
        assert data_prep._check_shape(image) is image
    else:
        with pytest.raises(ValueError, match=f"it is {size[0]}x{size[1]} pixels: an aspect ratio over 200"):
            data_prep._check_shape(image)


def test_choices_of_2_and_of_26_options_are_records(demo_data, tmp_path):
    """README (bad input): `choices` must be a list of 2 to 26 options (the rows above refuse 1 and 27); both ends are
    fine, the answer an option's letter (Z, the 26th) or text."""
    rows = _rows(Path(demo_data["sft"]))[:2]
    rows[0].update(choices=["4", "5"], answer="B")
    rows[1].update(choices=[f"option {k}" for k in range(26)], answer="Z")
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [len(r["choices"]) for r in data_prep.load_records(str(path))] == [2, 26]


@pytest.mark.parametrize("stage, flag", [("aepo", "--max-prompt-len"), ("coldstart", "--max-response-len")])
def test_data_that_is_all_too_long_names_the_file_and_the_shortest_length(stage, flag, tiny_ckpt, demo_data, tmp_path,
                                                                          monkeypatch):
    """Before: 'every prompt is longer than --max-prompt-len 8' named no file, and a cold start whose every trace was
    too long blamed the batch size ('--batch-size 2 is larger than the 0 usable records'), both after the model had
    loaded. Now they are measured with the processor alone, before any weights load."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(Path(demo_data["sft"]))))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", stage, "--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "out"),
                   "--steps", "1", "--batch-size", "2", flag, "2"])
    what = "prompt" if stage == "aepo" else "trace"
    msg = str(err.value.code)
    assert msg.startswith(f"data error: {path}: every {what} is longer than {flag} 2 tokens (the shortest has "), msg
    assert "\n" not in msg and "batch-size" not in msg, msg


def test_a_cold_start_drops_the_traces_longer_than_max_response_len_and_says_how_many(tiny_ckpt, demo_data, tmp_path,
                                                                                      monkeypatch, capsys):
    """README (paper settings): a trace longer than --max-response-len (its tokens and the end of turn) is dropped, with
    a count printed, and the rest train. Four traces of 5, 9, 10 and 17 tokens at --max-response-len 9: two are
    dropped (10 counts its end of turn), a trace of exactly 9 tokens is kept, and the batch check then counts the 2
    usable records."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    rows = _rows(Path(demo_data["sft"]))
    for row, n in zip(rows, (4, 8, 9, 16)):  # n tokens of text, + 1 end of turn
        row["response"] = "7" * n  # one token a digit
        assert len(tok(row["response"], add_special_tokens=False)["input_ids"]) == n
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "out"),
                   "--steps", "1", "--batch-size", "3", "--max-response-len", "9"])
    assert str(err.value.code) == "--batch-size 3 is larger than the 2 usable records"
    assert "dropped 2 traces longer than --max-response-len 9\n" in capsys.readouterr().out


@pytest.mark.parametrize("stage, world, words", [
    ("coldstart", 1, "--batch-size 5 is larger than the 4 usable records"),
    ("aepo", 1, "--batch-size 5 is larger than the 4 usable prompts"),
    ("aepo", 2, "--batch-size 5 must be divisible by the number of ranks 2"),
])
def test_a_batch_the_data_or_the_ranks_cannot_fill_stops_before_the_weights_load_and_before_overwrite(
        stage, world, words, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """Before, the batch was checked after the weights had loaded (on 8 GPUs and a 7B model, minutes for a typo), and
    after --overwrite had deleted the run in --out. Now it stops with one line first, and the old run is untouched."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(Path(demo_data["sft"]))))  # 4 records
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "COMPLETE").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(ares, "world_size", lambda: world)
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", stage, "--model", str(tiny_ckpt), "--data", str(path), "--out", str(out), "--steps", "1",
                   "--batch-size", "5", "--overwrite"])
    assert str(err.value.code) == words
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and (out / "metrics.jsonl").read_text()


# Files that are not records at all: (name, file name, content, words).
FILES = [
    ("line is a list", "data.jsonl", b'["a", "b"]\n', ['record #4: is ["a", "b"], not an object']),
    ("line is a number", "data.jsonl", b"5\n", ["record #4: is 5, not an object"]),
    ("line is a string", "data.jsonl", b'"hello"\n', ['record #4: is "hello", not an object']),
    ("line is null", "data.jsonl", b"null\n", ["record #4: is null, not an object"]),
    ("non-UTF-8 bytes", "data.jsonl", b'{"id": "x", "question": "caf\xe9", "answer": "1"}\n', ["line 5", "UTF-8", "0xe9"]),
    ("a lone surrogate escape", "data.jsonl", b'{"id": "x", "question": "caf\\ud800", "answer": "1"}\n',  # was a
     ["line 5", "not UTF-8 text", "\\ud800"]),  # TypeError from the tokenizer (an emoji's pair of escapes is fine)
    ("json list of ints", "ints.json", b"[1, 2, 3]", ["record #0: is 1, not an object"]),
    ("broken json list", "broken.json", b'[{"id": "a"', ["the file", "not valid JSON"]),
    ("corrupt parquet", "bad.parquet", b"PAR1 this is not parquet PAR1", ["cannot be read as a dataset"]),
    ("a file of another kind", "data.csv", b"id,question,answer\n", ["not a .jsonl"]),
    ("an integer of 5,000 digits", "data.jsonl", b'{"id": "big", "question": "q", "answer": ' + b"1" * 5000 + b"}\n",
     ["line 5", "not valid JSON", "4300 digits"]),  # Python's json refuses it with a ValueError, not a decode error
]


@pytest.mark.parametrize("name, filename, content, words", FILES, ids=[f[0] for f in FILES])
def test_unreadable_data_file_stops_with_one_line_naming_the_file(name, filename, content, words, demo_data, tmp_path,
                                                                tiny_ckpt):
    path = tmp_path / filename
    good = b"".join(json.dumps(r).encode() + b"\n" for r in _rows(Path(demo_data["sft"])))
    path.write_bytes(good + content if filename == "data.jsonl" else content)
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "aepo", "--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "out")])
    msg = str(err.value.code)
    assert msg.startswith(f"data error: {path}") and "\n" not in msg, msg
    assert all(w.lower() in msg.lower() for w in words), msg
    assert not (tmp_path / "out").exists()


def test_missing_hub_dataset_is_a_data_error(tmp_path):
    with pytest.raises(data_prep.DataError, match="no_such_org/no_such_dataset: cannot be read as a dataset"):
        data_prep.load_records("no_such_org/no_such_dataset")


def test_ordinary_records_still_pass(demo_data, tmp_path):
    """The checks do not reject what a dataset legitimately holds: <think> tags, numeric answers and ids, an
    absolute value written '<|x|>', a response-less record outside the cold start, an emoji (json.dumps writes it as
    a pair of surrogate escapes)."""
    rows = _rows(Path(demo_data["sft"]))
    rows[0].update(id=17, answer=5, response="<think>so \U0001F600</think> \\boxed{5}")
    rows[1].update(question="Is 3 <|x|> 2 for x = 1?", answer=0.5)
    rows[2].update(response="")
    rows[3].update(answer=int("7" * 400))  # finite, though math.isfinite cannot take it (it overflowed)
    rows[2].update(images=None)  # README (data format): images may be null or left out, and source defaults to
    del rows[1]["images"], rows[1]["source"]  # the file's name
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = data_prep.load_records(str(path))
    assert [r["id"] for r in records][:2] == ["17", rows[1]["id"]] and records[0]["answer"] == "5"
    assert records[1]["images"] == records[2]["images"] == [] and len(records[0]["images"]) == 1
    assert [r["source"] for r in records] == ["demo", "ok", "demo", "demo"]
    with pytest.raises(SystemExit) as err:  # AEPO reads all four as good: it stops at the one broken after them
        path.write_text(path.read_text() + json.dumps(dict(rows[0], id="broken-7", answer=True)) + "\n")
        ares.main(["--stage", "aepo", "--model", "tiny", "--data", str(path), "--out", str(tmp_path / "o")])
    assert str(err.value.code).startswith(f"data error: {path}: record broken-7: field 'answer'"), err.value.code
    assert records[0]["response"] == "<think>so \U0001F600</think> \\boxed{5}" and "\\ud83d" in path.read_text()
    assert records[1]["answer"] == "0.5" and records[3]["answer"] == "7" * 400 and len(records) == 4
    listed = tmp_path / "listed.json"  # one JSON list after a byte-order mark, as Windows editors save it
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert [r["id"] for r in data_prep.load_records(str(listed))] == [r["id"] for r in records]


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl survives a kill at any moment of a resume.

def coldstart(data, out, model, *extra):
    return ["--stage", "coldstart", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--micro-batch-size", "4", "--save-every", "2", *[str(e) for e in extra]]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


KILL_AT_STARTUP = '''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import ares

start = ares.Metrics.__init__
def start_then_die(self, *args, **kw):  # as a kill -9 right after start-up would
    start(self, *args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)
ares.Metrics.__init__ = start_then_die
ares.main(sys.argv[2:])
'''


def test_a_kill_right_after_resume_starts_loses_no_metrics(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = coldstart(demo_data["sft"], out, tiny_ckpt)
    run_until_first_step_save(monkeypatch, lambda: ares.main(args))
    assert steps_logged(out) == [1, 2]
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_AT_STARTUP)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, driver, ROOT, *args, "--resume"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert steps_logged(out) == [1, 2]  # the history is still there
    assert not (out / "metrics.jsonl.tmp").exists()


def test_resume_drops_a_partial_last_metrics_line_with_a_warning(tiny_ckpt, demo_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = coldstart(demo_data["sft"], out, tiny_ckpt)
    run_until_first_step_save(monkeypatch, lambda: ares.main(args))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 1.2')  # a write cut short by a kill
    ares.main(args + ["--resume"])
    assert steps_logged(out) == [1, 2, 3, 4]
    assert "metrics.jsonl line 3 is not a complete step row" in capsys.readouterr().out


def test_resume_cuts_metrics_back_by_an_fsynced_new_file_renamed_over_the_old_one(tmp_path, monkeypatch):
    """README (bad input): on --resume, metrics.jsonl is cut back to the checkpoint's step by writing a new file,
    fsyncing it and renaming it over the old one (then the folder is fsynced, so that the rename is on disk too): the
    disk holds one of the two files whole at any moment, never the old one truncated in place."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    old = path.stat().st_ino
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    ares.Metrics(tmp_path, total=6, start=2, desc="resumed").close()
    tmp = f"{path}.tmp"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert path.stat().st_ino != old and steps_logged(tmp_path) == [1, 2]


def test_a_damaged_metrics_line_is_dropped_with_a_warning_that_says_which_kind(tmp_path, capsys):
    """Only the last line of metrics.jsonl can be cut short by a kill; a bad line before it was edited or damaged."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n["step", 2]\n{"step": 3}\n\n{"step": 4, "lo\n')
    assert [r["step"] for r in ares.logged_rows(path)] == [1, 3]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {path} line 2 is not a complete step row (the file was edited or damaged): dropped",
        f"warning: {path} line 3 is not a complete step row (the file was edited or damaged): dropped",
        f"warning: {path} line 6 is not a complete step row (cut short by a kill?): dropped"]


def test_a_cut_metrics_line_is_warned_about_once_per_process(tmp_path, capsys):
    """demo-report reads the AEPO run's metrics.jsonl four times (bucket_shares over all steps and the first half,
    plot_curves), and said the same cut last line was dropped each time: now once per file and line in a process."""
    import eval as ev

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "level_easy_groups_low": 1}\n{"step": 2, "lo\n')
    for part in (1.0, 0.5, 1.0):  # as demo_report asks
        ev.bucket_shares(path, part)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {path} line 2 is not a complete step row (cut short by a kill?): dropped"]


def test_a_damaged_line_in_each_log_and_at_each_line_is_warned_about_once(tmp_path, capsys):
    """WARNED_ROWS keys a warning by file, line number and text: demo-report reads the AEPO and the GRPO runs' logs,
    whose cut last lines can read the same, and a log may hold the same damaged text on two lines; each is warned
    about once however often it is read, and a line that changed is warned about again. Keyed without the file or the
    line number, the second of each was never said, and the test above (one file, one line) passed."""
    aepo, grpo, edited = tmp_path / "aepo.jsonl", tmp_path / "grpo.jsonl", tmp_path / "edited.jsonl"
    for path in (aepo, grpo):
        path.write_text('{"step": 1}\n{"step": 2, "lo\n')
    edited.write_text('oops\n{"step": 1}\noops\n{"step": 2}\n')
    for _ in range(2):
        for path in (aepo, grpo, edited):
            ares.logged_rows(path)
    aepo.write_text('{"step": 1}\n{"step": 2, "loss": 0.\n')  # the run went on and was cut again at line 2
    ares.logged_rows(aepo)
    cut, damaged = "(cut short by a kill?)", "(the file was edited or damaged)"
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {aepo} line 2 is not a complete step row {cut}: dropped",
        f"warning: {grpo} line 2 is not a complete step row {cut}: dropped",
        f"warning: {edited} line 1 is not a complete step row {damaged}: dropped",
        f"warning: {edited} line 3 is not a complete step row {damaged}: dropped",
        f"warning: {aepo} line 2 is not a complete step row {cut}: dropped"]


# ----------------------------------------------------------------------------------------------------------
# The grader: right on Unicode digits, bounded off the main thread, parallel, and its time limit is a hard one.

DIGITS = [
    ("１２", "12", True),  # fullwidth
    ("12", "１２", True),
    ("٣", "3", True),  # Arabic-Indic
    ("۴۲", "42", True),  # Extended Arabic-Indic (Persian)
    ("१०", "10", True),  # Devanagari
    ("\\frac{١}{٢}", "0.5", True),
    ("（Ｂ）", "B", True),  # a fullwidth choice letter
    ("１２", "13", False),
    ("٣", "4", False),
    ("10²", "102", False),  # a superscript is not a digit (full NFKC would make this 102)
]


@pytest.mark.parametrize("pred, answer, verdict", DIGITS)
def test_unicode_digits_grade_like_ascii_ones(pred, answer, verdict):
    assert data_prep.is_correct(pred, answer) is verdict


TOWER = "9^{9^{9^{9}}}"


def test_grading_off_the_main_thread_is_bounded():
    done = []
    thread = threading.Thread(target=lambda: done.append(data_prep.is_correct(TOWER, "1")), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(120)
    assert done == [False], "still grading after 120 s"
    assert time.monotonic() - start < 60  # 3 s limit + starting a grader process on a busy 2-core machine


def test_grade_batch_matches_the_hand_graded_table_in_workers_and_in_process():
    texts, answers, verdicts = zip(*GRADING)
    preds = [data_prep.extract_boxed(t) for t in texts]
    for workers in (0, 2):
        assert data_prep.grade_batch(preds, answers, 3.0, workers) == list(verdicts), workers


def test_a_grader_process_grades_without_loading_torch():
    """data_prep.py imports torch only where it makes tensors: each grader process (one per --grader-workers, per
    training or evaluation process) starts with math-verify alone, not torch's libraries too."""
    pool = data_prep.GraderPool(1)
    try:
        assert pool.map([("\\frac{1}{2}", "0.5")], timeout=3.0) == [True]
        maps = Path(f"/proc/{pool.procs[0].pid}/maps").read_text()  # the shared libraries the process has loaded
        assert "libtorch" not in maps
    finally:
        for p in pool.procs:
            p.kill()


def test_grader_time_limit_is_a_hard_one_even_for_a_stuck_worker(monkeypatch):
    """A worker stuck where no signal reaches it is killed at the limit (+2 s) and replaced."""
    stuck = "print('ready', flush=True); import time; time.sleep(1000)"
    monkeypatch.setattr(data_prep.GraderPool, "_spawn", staticmethod(
        lambda: subprocess.Popen([sys.executable, "-c", stuck], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, bufsize=1)))
    pool = data_prep.GraderPool(2)
    first = list(pool.procs)
    start = time.monotonic()
    assert pool.map([("1", "2"), ("3", "4"), ("5", "6")], timeout=0.5) == [False, False, False]
    assert time.monotonic() - start < 30
    assert all(p.poll() is not None for p in first) and not set(pool.procs) & set(first)
    for p in pool.procs:
        p.kill()


@pytest.mark.parametrize("tool", ["ares.py", "eval.py"])
@pytest.mark.parametrize("missing", ["tokenizer", "image processor"])
def test_a_model_folder_without_its_tokenizer_or_processor_files_stops_with_one_line(missing, tool, tiny_ckpt, demo_data,
                                                                                    tmp_path):
    """A model folder saved without its tokenizer (weights and config only) loaded an empty tokenizer that reads all
    text as nothing: training went on, on the special tokens alone, and eval.py scored empty answers. A VLM folder
    without its processor settings ended in transformers' hub-download traceback. Each now stops with one line naming
    the folder and the files it lacks, before the weights load."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    gone = ["tokenizer.json", "vocab.json", "merges.txt"] if missing == "tokenizer" else \
        ["processor_config.json", "preprocessor_config.json"]
    for name in gone:
        (model / name).unlink(missing_ok=True)
    with pytest.raises(SystemExit) as err:
        if tool == "ares.py":
            ares.main(["--stage", "aepo", "--model", model, "--data", demo_data["rl"], "--out", tmp_path / "out",
                       "--steps", "1"])
        else:
            import eval as ev

            ev.main(["--model", str(model), "--data", str(demo_data["test"]), "--out", str(tmp_path / "ev")])
    msg = str(err.value.code)
    want = {"tokenizer": f"{model}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt)",
            "image processor": f"{model}: no image processor settings (processor_config.json or "
                               "preprocessor_config.json)"}[missing]
    assert msg.startswith(want) and "\n" not in msg, msg


@pytest.mark.parametrize("case", ["out is a checkpoint", "out inside a checkpoint", "model is a run folder",
                                  "model is a LoRA adapter"])
def test_a_folder_of_the_wrong_kind_stops_with_one_line_and_is_left_as_it_was(case, tiny_ckpt, demo_data, tmp_path):
    """--out naming a saved model (or a folder inside one) would have had its config.json replaced by the run record
    (the checkpoint then no longer loaded); --model naming a run folder or a LoRA adapter folder gave a traceback after
    the run record was written. Each now stops with one line saying what to give instead, before anything is written."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "time": 0.0, "files": {}}))  # one of ares.py's checkpoints
    (ckpt / "adapter").mkdir()
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "aepo"}}))
    before = {p: p.read_bytes() for p in [*ckpt.rglob("*.json"), run / "config.json"]}
    model, out = str(tiny_ckpt), tmp_path / "out"
    message = {"out is a checkpoint": f"--out {ckpt}: it is a saved model, not a run folder",
               "out inside a checkpoint": f"--out {ckpt / 'sub'}: {ckpt} is a saved model, not a run folder",
               "model is a run folder": f"--model {run}: a run folder, not a checkpoint: give {run / 'final'}",
               "model is a LoRA adapter": f"--model {ckpt / 'adapter'}: a LoRA adapter alone: give the checkpoint "
                                          f"that holds it, {ckpt}"}[case]
    if case.startswith("out"):
        out = ckpt if case == "out is a checkpoint" else ckpt / "sub"
    else:
        model = str(run if case == "model is a run folder" else ckpt / "adapter")
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "aepo", "--model", model, "--data", str(demo_data["rl"]), "--out", str(out), "--steps", "1"])
    msg = str(err.value.code)
    assert msg.startswith(message) and "\n" not in msg, msg
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "out").exists() and not (ckpt / "sub").exists()


def test_a_model_folder_whose_config_json_is_another_tools_says_so():
    """--model X where X/config.json is another tool's ({"flags": [...]}, no model_type): model_folder_kind now takes
    it for neither a run nor a model (1ee1ca1), and the line said 'it has no config.json' of a folder that has one."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({"flags": ["-O2"], "lr": 3e-4}))
        with pytest.raises(SystemExit) as err:
            ares.check_model_path("--model", d)
    assert str(err.value.code) == (f"--model {d}: not a model folder (its config.json is not a model's: no model_type); "
                                   "give a saved checkpoint folder or a hub name like Org/Model")


@pytest.mark.parametrize("inside", ["tensorboard/plots", "final", "step_00000004/eval"])
def test_no_output_goes_under_a_name_a_training_run_writes_in_its_folder(inside, tiny_ckpt, demo_data, tmp_path):
    """A name the run writes in its folder (RUN_NAMES: tensorboard/, which --overwrite deletes; a final/ or step_<n>/
    not saved yet, which its save replaces whole) was refused for an output only as the last part of the path:
    eval.py --out runs/x/tensorboard/plots or runs/x/final/eval (before the run's final save) was taken, and ares.py's
    own --out took all three. Each tool now stops with one line naming the flag and the run's name, before anything
    is written; a subfolder of another name (runs/x/eval) is still taken."""
    import eval as ev

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "aepo"}}))  # a run that has saved nothing yet
    out = run / inside
    name = run / inside.split("/")[0]
    for fn, argv in ((ev.check_paths, None), (ares.main, ["--stage", "aepo", "--model", str(tiny_ckpt), "--data",
                                                           str(demo_data["rl"]), "--out", str(out), "--steps", "1"])):
        with pytest.raises(SystemExit) as err:
            fn([str(tiny_ckpt)], str(out)) if argv is None else fn(argv)
        msg = str(err.value.code)
        assert msg.startswith(f"--out {out}: ") and f"{name}" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert ares.check_clear_of_run("--out", run / "eval" / "plots") is None


def test_every_name_a_run_writes_in_its_folder_is_refused_and_a_users_name_beside_them_is_not(tmp_path):
    """The names ares.py writes in a run's folder, listed by hand from the trainer: config.json (run_record),
    metrics.jsonl (the step log), ares.lock and ares.lock.<pid> (take_lock), tensorboard/ (--report-to), final/ and
    step_<n>/ (save_checkpoint), each also as <name>.tmp while it is written and <name>.old while it is replaced. An
    eval.py --plot or --out at or under each is refused; a user's name beside them is not. The tests above tried
    config.json, step_<n>, final and tensorboard only, so RUN_NAMES losing metrics.jsonl (eval.py --plot
    runs/x/metrics.jsonl written over the run's log), ares.lock or the .tmp/.old names passed every test. Outside a
    run (no run record beside them) the same names are taken."""
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "aepo"}}))
    for name in ("config.json", "metrics.jsonl", "ares.lock", "ares.lock.4242", "tensorboard", "final", "final.tmp",
                 "final.old", "step_00000004", "step_00000004.tmp", "step_00000004.old"):
        for path, folder in ((run / name, False), (run / name / "eval", True)):
            with pytest.raises(SystemExit) as err:
                ares.check_clear_of_run("--plot" if not folder else "--out", path, folder=folder)
            assert f": {run / name} is the training run's own {name}" in str(err.value.code) or \
                f": {run} is the folder of a training run, which writes its own {name} there" in str(err.value.code), \
                (name, err.value.code)
    for name in ("acc.png", "eval", "final2", "step_backup1", "plots.old", "metrics.jsonl.bak", "ares.lock.old"):
        assert ares.check_clear_of_run("--plot", run / name, folder=False) is None, name
    elsewhere = tmp_path / "results"  # no run record: the same names are a user's folders and files
    for name in ("final", "metrics.jsonl", "step_00000004", "tensorboard"):
        assert ares.check_clear_of_run("--out", elsewhere / name / "eval") is None, name


@pytest.mark.parametrize("tool", ["ares --split", "ares --eval-data", "eval.py --split"])
def test_a_saved_dataset_without_the_split_asked_for_is_one_line_naming_its_splits(tool, tiny_ckpt, demo_data,
                                                                                    tmp_path, monkeypatch):
    """A saved DatasetDict (save_to_disk) read through --split, or as --eval-data (which reads 'test'), ended in
    KeyError and a traceback when the split was not there; data_prep.py convert already said which splits it has."""
    import datasets
    import eval as ev

    saved = tmp_path / "saved"
    rows = datasets.Dataset.from_dict(dict(id=["a", "b"], question=["What is 1 + 1?", "What is 2 + 2?"], answer=["2", "4"]))
    datasets.DatasetDict(train=rows, validation=rows).save_to_disk(str(saved))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    argv = {"ares --split": (ares.main, ["--stage", "aepo", "--data", saved, "--split", "nosuch"]),
            "ares --eval-data": (ares.main, ["--stage", "aepo", "--data", demo_data["rl"], "--eval-data", saved]),
            "eval.py --split": (ev.main, ["--data", saved, "--split", "nosuch"])}
    fn, args = argv[tool]
    with pytest.raises(SystemExit) as err:
        fn([str(a) for a in [*args, "--model", tiny_ckpt, "--out", out]])
    split, flag = ("test", "--eval-data: ") if tool == "ares --eval-data" else ("nosuch", "")
    assert str(err.value.code) == (f"data error: {flag}{saved}: no split '{split}' (it has train, validation): name "
                                   "one with --split (ares.py's --eval-data reads 'test')")
    assert not out.exists()


@pytest.mark.parametrize("tool", ["ares --eval-data", "eval.py --data"])
def test_a_preset_with_no_held_out_split_is_one_line_before_any_download(tool, tiny_ckpt, demo_data, tmp_path,
                                                                          monkeypatch):
    """ViRL39K publishes one split, train. `--eval-data virl39k` and `eval.py --data virl39k` asked the hub for its
    'test' split: a download of the whole data set, then the hub's error (or, had the train split been read, the
    problems --data virl39k trains on, graded as if held out). Now one line naming the preset, and nothing asked of
    the hub; `eval.py --split train` still reads the train split when a user names it."""
    import datasets
    import eval as ev

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, split=None, **k: asked.append((name, split)) or
                        pytest.fail("the hub was asked"))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    fn, args, flag = {"ares --eval-data": (ares.main, ["--stage", "aepo", "--data", demo_data["rl"], "--eval-data",
                                                       "virl39k"], "--eval-data: "),
                      "eval.py --data": (ev.main, ["--data", "virl39k"], "")}[tool]
    with pytest.raises(SystemExit) as err:
        fn([str(a) for a in [*args, "--model", tiny_ckpt, "--out", out]])
    msg = str(err.value.code)
    assert msg.startswith(f"data error: {flag}virl39k: TIGER-Lab/ViRL39K publishes a train split only") and "\n" not in msg
    assert asked == [] and not out.exists()
    assert data_prep.held_out_split("geometry3k") == "test" and data_prep.held_out_split("mathvista-testmini") == "testmini"


def test_eval_data_with_no_held_out_split_stops_before_data_is_read(tmp_path, monkeypatch):
    """`ares.py --data virl39k --eval-data virl39k` (the paper's prompts, validated on themselves) read all of --data
    (ViRL39K from the hub) before held_out_split's line about --eval-data: the flag's line now comes with the other
    flags' checks, before any data is read."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked for --data"))
    monkeypatch.setattr(data_prep, "read_records", lambda *a, **k: pytest.fail("--data was read"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", "aepo", "--model", "tiny", "--data", "virl39k", "--eval-data", "virl39k", "--out", str(out)])
    assert str(err.value.code).startswith("data error: --eval-data: virl39k: TIGER-Lab/ViRL39K publishes a train "
                                          "split only")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# eval.py (evaluation and passrate) and data_prep.py: the same one-line rule, before anything is read or written.

def _tool_cases():
    import eval as ev

    ev_args = lambda *a: ["--data", "{bench}", "--out", "{tmp}/eval", *a]  # noqa: E731
    pr_args = lambda *a: ["passrate", "--data", "{bench}", "--model", "{ckpt}", "--out", "{tmp}/rates.jsonl", *a]  # noqa
    return [
        (ev.main, ["--model", "{run}", *ev_args()], "--model {run}: a run folder, not a checkpoint: give {run}/final"),
        (ev.main, ["--model", "{tmp}/nope/dir", *ev_args()], "--model {tmp}/nope/dir: no such folder"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--limit", "-1")], "--limit must be >= 0, got -1"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--temperature", "nan")],
         "--temperature must be 0 (greedy) or >= 0.01 and finite, got nan"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--temperature", "1e-40")],  # every response the last vocabulary token
         "--temperature must be 0 (greedy) or >= 0.01, got 1e-40"),
        (ev.main, pr_args("--temperature", "1e-40"), "--temperature must be 0 (greedy) or >= 0.01, got 1e-40"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--max-pixels", "10")], "--max-pixels must be >= --min-pixels, got 10"),
        (ev.main, ["--model", "{ckpt}", "--data", "{bench}", "--out", "{bench}"], "--out {bench}: a file, not a folder"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--max-prompt-len", "0")], "--max-prompt-len must be >= 1, got 0"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--seed", "-1")], "--seed must be in [0, 2**32), got -1"),  # were
        (ev.main, ["--model", "{ckpt}", *ev_args("--samples", "0")], "--samples must be >= 1, got 0"),  # accepted; one
        (ev.main, ["--model", "{ckpt}", *ev_args("--top-p", "0")], "--top-p must be in (0, 1], got 0.0"),  # line for 4
        (ev.main, pr_args("--seed", "-1"), "--seed must be in [0, 2**32), got -1"),
        (ev.main, pr_args("--k", "0"), "--k must be >= 1, got 0"),
        (ev.main, pr_args("--limit", "-3"), "--limit must be >= 1, got -3"),
        (ev.main, pr_args("--split", "test"), "--split test: --data {bench} is one file, without splits: leave --split out"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--split", "test")],  # a file is read whole: the flag was ignored
         "--split test: --data {bench} is one file, without splits: leave --split out"),
        (ev.main, ["--model", "{ckpt}", *ev_args("--config", "testmini")],
         "--config testmini: --data {bench} is one file, without configs: leave --config out"),
        (ev.main, ["passrate", "--data", "{bench}", "--model", "{tmp}/nope", "--out", "{tmp}/r.jsonl"],
         "--model {tmp}/nope: no such folder"),
        (ev.main, ["passrate", "--data", "{pad}", "--model", "{ckpt}", "--out", "{tmp}/r.jsonl"],
         "data error: {pad}: record pad: field 'question' contains the chat-template token '<|image_pad|>'"),
        (ev.main, ["passrate", "--data", "{bench}", "--model", "{ckpt}", "--out", "{tmp}"],
         "--out {tmp}: a folder; give the output file"),
        # README (bad input): a file of another kind is named by every tool (convert and adacs: test_data_prep.py)
        (ev.main, ["passrate", "--data", "{csv}", "--model", "{ckpt}", "--out", "{tmp}/r.jsonl"],
         "data error: {csv}: not a .jsonl, .json, .parquet or saved dataset folder"),  # passrate asked the hub for it
        (ev.main, ["--model", "{ckpt}", "--data", "{csv}", "--out", "{tmp}/eval"],
         "data error: {csv}: not a .jsonl, .json, .parquet or saved dataset folder"),
        # inside a checkpoint: the run's next save (a --resume that extends it), --keep-last or --overwrite deleted it
        (ev.main, ["--model", "{ckpt}", "--data", "{bench}", "--out", "{final}/eval"],
         "--out {final}/eval: {final} is a checkpoint of a training run, which its next save, --keep-last or --overwrite "
         "replaces whole: give a folder outside it"),
        (ev.main, ["--model", "{ckpt}", "--data", "{bench}", "--out", "{final}"], "--out {final}: it is a checkpoint"),
        (ev.main, ["passrate", "--data", "{bench}", "--model", "{ckpt}", "--out", "{final}/rates.jsonl"],
         "--out {final}/rates.jsonl: {final} is a checkpoint of a training run"),
        (ev.main, ["curves", "{tmp}"], "curves {tmp}: a folder; give an AEPO run's metrics.jsonl"),
        (ev.main, ["curves", "{tmp}/nope.jsonl"], "curves {tmp}/nope.jsonl: no such file; give an AEPO run's metrics.jsonl"),
        (ev.main, ["curves", "{bench}"], "curves {bench}: no AEPO step rows in it; give an AEPO run's metrics.jsonl"),
        (ev.main, ["demo-report", "{tmp}/nope"], "demo-report {tmp}/nope: no such folder; give the --out folder"),
        (ev.main, ["demo-report", "{bench}"], "demo-report {bench}: a file; give the --out folder"),
        (ev.main, ["demo-report", "{run}"], "demo-report {run}: no data/test.jsonl in it; give the --out folder"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--k", "-2", "--out", "{tmp}/a.jsonl"], "--k must be >= 1, got -2"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--seed", "-5", "--out", "{tmp}/a.jsonl"],
         "--seed must be in [0, 2**32), got -5"),
        (data_prep.main, ["demo", "--seed", "-5", "--out", "{tmp}/d"], "--seed must be in [0, 2**32), got -5"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--per-bracket", "0", "--out", "{tmp}/a.jsonl"],
         "--per-bracket must be >= 1, got 0"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--model", "{run}", "--out", "{tmp}/a.jsonl"],
         "--model {run}: no tokenizer there (tokenizer.json); give a checkpoint folder"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--out", "{tmp}"], "--out {tmp}: a folder; give the output file"),
        (data_prep.main, ["convert", "--data", "{bench}", "--out", "{tmp}/c.txt"],  # JSON lines were written to it,
         "--out {tmp}/c.txt: give a .jsonl or .parquet file (no stage reads a *.txt file)"),  # which no stage read
        (data_prep.main, ["convert", "--data", "{bench}", "--out", "{tmp}/c.JSONL"],  # the suffix is read as written
         "--out {tmp}/c.JSONL: give a .jsonl or .parquet file (no stage reads a *.JSONL file)"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--out", "{tmp}/a"],
         "--out {tmp}/a: give a .jsonl or .parquet file (no stage reads a file without a suffix)"),
        (data_prep.main, ["convert", "--data", "{bench}", "--split", "test", "--out", "{tmp}/c.jsonl"],  # every row was
         "--split test: --data {bench} is one file, without splits: leave --split out"),  # written, as if the test split
        (data_prep.main, ["convert", "--data", "{bench}", "--config", "testmini", "--out", "{tmp}/c.jsonl"],
         "--config testmini: --data {bench} is one file, without configs: leave --config out"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--split", "test", "--out", "{tmp}/a.jsonl"],
         "--split test: --data {bench} is one file, without splits: leave --split out"),
        (data_prep.main, ["convert", "--data", "{bench}", "--limit", "0", "--out", "{tmp}/c.jsonl"],
         "--limit must be >= 1, got 0"),
        (data_prep.main, ["convert", "--data", "{pad}", "--out", "{tmp}/c.jsonl"],
         "data error: {pad}: record pad: field 'question' contains the chat-template token '<|image_pad|>'"),
        (data_prep.main, ["convert", "--data", "{level}", "--out", "{tmp}/c.jsonl"],
         "data error: {level}: record level: field 'difficulty' must be text or an integer, got 2.5"),
        (data_prep.main, ["convert", "--data", "{levels}", "--out", "{tmp}/c.jsonl"],  # a list is not left out
         "data error: {levels}: record levels: field 'difficulty' must be text or an integer, got [\"hard\"]"),
        (ev.main, ["passrate", "--data", "{level}", "--model", "{ckpt}", "--out", "{tmp}/r.jsonl"],
         "data error: {level}: record level: field 'difficulty' must be text or an integer, got 2.5"),
        (data_prep.main, ["adacs", "--data", "{k16}", "--out", "{tmp}/a.jsonl"],  # K = 16 rates read as K = 8
         "data error: {k16}: record k16: pass_rate 0.0625 is not a multiple of 1/8 (--k 8): the pass rates look like "
         "K = 16 (pass --k 16)"),
        (data_prep.main, ["adacs", "--data", "{bench}", "--pass-rates", "{k16}", "--k", "4", "--out", "{tmp}/a.jsonl"],
         "data error: {k16}: record k16: pass_rate 0.0625 is not a multiple of 1/4 (--k 4): the pass rates look like "
         "K = 16 (pass --k 16)"),
        (data_prep.main, ["adacs", "--data", "{odd}", "--out", "{tmp}/a.jsonl"],
         "data error: {odd}: record odd: pass_rate 0.314159 is not a multiple of 1/8 (--k 8): give --k the number of "
         "samples per problem the pass rates were measured with"),
        (data_prep.main, ["demo", "--sft", "0", "--out", "{tmp}/demo"], "--sft must be >= 1, got 0"),
        (data_prep.main, ["demo", "--out", "{bench}"], "--out {bench}: a file, not a folder"),
    ]


def test_split_and_config_stop_only_where_every_data_is_one_file():
    """eval.py takes several --data: --split testmini with a JSONL file and mathvista-testmini splits the preset, so it
    is used and must pass; it is ignored, and stops, only where every --data is a file read whole. The _tool_cases rows
    give one file alone, which any() and all() both refuse."""
    data_prep.check_split_flags(["bench.jsonl", "mathvista-testmini"], split="testmini")  # the preset reads it
    data_prep.check_split_flags(["saved_folder", "bench.parquet"], split="test", config="")  # a folder has splits
    data_prep.check_split_flags("bench.jsonl", split=None, config="")  # neither flag given
    with pytest.raises(SystemExit, match=r"^--config c: --data a\.json is one file, without configs: leave --config"):
        data_prep.check_split_flags(["a.json", "b.parquet"], split="", config="c")


@pytest.mark.parametrize("case", range(len(_tool_cases())))
def test_eval_and_data_prep_stop_with_one_line_before_anything_loads(case, tiny_ckpt, demo_data, tmp_path):
    """Before: tracebacks after the model had loaded (a run folder or a LoRA adapter as --model, --k 0, a chat-template
    token in passrate's data), runs on nonsense (--temperature nan, --max-pixels under --min-pixels, convert --limit 0
    writing a record, demo --sft 0 writing empty splits), or a checkpoint written into by convert; `eval.py curves`
    and `demo-report` on a folder, a missing path or the wrong file ended in IsADirectoryError, FileNotFoundError or
    a KeyError."""
    fn, argv, message = _tool_cases()[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "aepo"}}))
    (run / "final").mkdir()  # one of its checkpoints, as save_checkpoint leaves it
    (run / "final" / "COMPLETE").write_text(json.dumps({"step": 3, "time": 0.0, "files": {}}))
    rows = _rows(Path(demo_data["rl"]))
    bench, pad = tmp_path / "bench.jsonl", tmp_path / "pad.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pad.write_text("".join(json.dumps(r) + "\n" for r in rows + [dict(rows[0], id="pad", question="What <|image_pad|>?")]))
    broken = dict(level=dict(difficulty=2.5), levels=dict(difficulty=["hard"]), k16=dict(pass_rate=1 / 16),
                  odd=dict(pass_rate=0.314159))
    for name, fields in broken.items():  # the rows, then one more with the bad field, as the file's last record
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [dict(rows[0], id=name,
                                                                                                   **fields)]))
    (tmp_path / "d.csv").write_text("id,question,answer\na,Q,1\n")
    names = dict(tmp=tmp_path, run=run, final=run / "final", ckpt=tiny_ckpt, bench=bench, pad=pad,
                 csv=tmp_path / "d.csv",
                 **{n: tmp_path / f"{n}.jsonl" for n in broken})
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as err:
        fn([a.format(**names) for a in argv])
    msg = str(err.value.code)
    assert msg.startswith(message.format(**names)) and "\n" not in msg, msg
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


# convert, passrate and adacs read data through data_prep's column mapping (load_source), not check_records: each row
# below broke one of them, and the message is what the user now reads. (name, tool, the file's last line or lines,
# message after "data error: <file>: ").
def _pool(**fields):  # a candidate trace of problem p9, right and counted, with the fields given
    return dict(dict(id="p9", question="q", answer="3", response="\\boxed{3}", correct=True, length=5), **fields)


TOOL_ROWS = [
    ("answer true", "convert", [dict(id="t", question="q", answer=True)],
     "row 4 (id t): the answer (column 'answer') must be text or a finite number, got true"),  # was written as "True"
    ("answer NaN", "passrate", [dict(id="t", question="q", answer=math.nan)],
     "row 4 (id t): the answer (column 'answer') must be text or a finite number, got NaN"),
    ("answer a list", "convert", [dict(id="t", question="q", answer=[5])],
     "row 4 (id t): the answer (column 'answer') must be text or a finite number, got [5]"),
    ("question a number", "convert", [dict(id="t", question=7, answer="1")],
     "row 4 (id t): the question (column 'question') must be text, got 7"),
    ("id a list", "passrate", [dict(id=[3], question="q", answer="1")],
     "row 4: the id (column 'id') must be text or an integer, got [3]"),
    ("pass_rate NaN", "convert", [dict(id="t", question="q", answer="1", pass_rate=math.nan)],
     "row 4 (id t): pass_rate must be a number in [0, 1], got NaN"),
    ("response a list", "convert", [dict(id="t", question="q", answer="1", response=["a"])],
     "row 4 (id t): the response (column 'response') must be text, got [\"a\"]"),
    ("line is a number", "convert", [5], "row 4: is 5, not an object with a question and an answer"),  # was a TypeError
    ("line is null", "passrate", [None], "row 4: is null, not an object with a question and an answer"),
    ("a lone surrogate", "convert", [dict(id="t", question="caf\ud800", answer="1")],  # was written; to Parquet, a
     "line 5: not UTF-8 text (the escape \\ud800: half of a UTF-16 surrogate pair"),  # UnicodeEncodeError traceback
    ("truncated JPEG", "convert", [dict(id="t", question="q", answer="1", images=["trunc.jpg"])],
     "row 4 (id t): image 0 ('trunc.jpg') cannot be read: "),  # verify() passed it; PIL's words vary with the cut
    ("images false", "convert", [dict(id="t", question="q", answer="1", images=False)],  # README (data format): as
     "row 4 (id t): image 0 ('False') cannot be read: unsupported image type bool"),  # ares.py, not "no image"
    ("images 0", "passrate", [dict(id="t", question="q", answer="1", images=0)],
     "row 4 (id t): image 0 ('0') cannot be read: unsupported image type int"),
    ("300x1 image", "passrate", [dict(id="t", question="q", answer="1", images=["wide.png"])],
     "row 4 (id t): image 0 ('wide.png') cannot be read: it is 300x1 pixels: an aspect ratio over 200"),
    ("correct the text false", "adacs", [_pool(correct="false")],
     "trace of problem 'p9': field 'correct' must be true or false, got \"false\""),  # bool("false") chose it
    ("length a word", "adacs", [_pool(length="abc")],
     "trace of problem 'p9': field 'length' must be a count of tokens (an integer >= 0), got \"abc\""),
    ("length negative", "adacs", [_pool(length=-50)],
     "trace of problem 'p9': field 'length' must be a count of tokens (an integer >= 0), got -50"),
    ("1 of 3 traces right, --k 8", "adacs", [_pool(), _pool(correct=False), _pool(correct=False)],
     "problem 'p9': 1 of its 3 traces are right, a pass rate that is not a multiple of 1/8 (--k 8)"),
    ("im_end in a trace", "adacs", [_pool(response="<|im_end|> \\boxed{3}")],  # was copied into the cold start's data
     "record p9: field 'response' contains the chat-template token '<|im_end|>'"),
    ("a trace without an id", "adacs", [{k: v for k, v in _pool().items() if k != "id"}],
     "row 4: no column 'id' for the id"),  # each trace was its own problem
]


@pytest.mark.parametrize("name, tool, last, message", TOOL_ROWS, ids=[r[0] for r in TOOL_ROWS])
def test_convert_passrate_and_adacs_refuse_what_training_refuses(name, tool, last, message, tiny_ckpt, tmp_path):
    """Before: convert and passrate wrote true, NaN, [5] and 7 as the text "True", "nan", "[5]", "7" (which then passed
    every check of ares.py), crashed with a TypeError on a line that is not an object, and let a truncated JPEG and a
    300x1 image through (the cold start or passrate failed later, after the model had loaded); adacs took the text
    "false" for a right trace, crashed on a length "abc", counted a trace without an id as a problem of its own, and
    put a pass rate of 1/3 in bracket 3/8. Now one line names the file and row, and nothing is written."""
    import eval as ev

    Image.new("RGB", (300, 1), (200, 0, 0)).save(tmp_path / "wide.png")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")  # one whose cut header verify() passes
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    good = [_pool(id=f"p{k}") if tool == "adacs" else dict(id=f"g{k}", question="q", answer="2") for k in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + last))
    out = tmp_path / "out.jsonl"
    argv = {"convert": (data_prep.main, ["convert", "--data", str(data), "--out", str(out)]),
            "adacs": (data_prep.main, ["adacs", "--data", str(data), "--out", str(out)]),
            "passrate": (ev.main, ["passrate", "--data", str(data), "--model", str(tiny_ckpt), "--k", "2", "--out",
                                   str(out)])}
    fn, args = argv[tool]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as err:
        fn(args)
    msg = str(err.value.code)
    assert msg.startswith(f"data error: {data}: {message}") and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_missing_dataset_or_a_corrupt_parquet_file_is_one_line_in_every_tool(tiny_ckpt, tmp_path):
    """Before: data_prep.py convert, adacs and eval.py (evaluation, passrate) ended a missing hub dataset, a missing
    folder or a file that is not Parquet with a traceback (ConnectionError, FileNotFoundError, ArrowInvalid), and
    `eval.py --data mathvista-testmini` asked the hub for a dataset of that name instead of the preset's AI4Math/MathVista
    (and made --out first). Offline here, so the hub answers as a missing dataset does."""
    import eval as ev

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    out = tmp_path / "out"
    cases = [
        (data_prep.main, ["convert", "--data", "no_such_org/no_such_dataset", "--out", f"{out}.jsonl"],
         "data error: no_such_org/no_such_dataset: cannot be read as a dataset: "),
        (data_prep.main, ["convert", "--preset", "geometry3k", "--out", f"{out}.jsonl"],
         "data error: hiyouga/geometry3k: cannot be read as a dataset: "),
        (data_prep.main, ["convert", "--data", str(tmp_path / "no_such_folder"), "--out", f"{out}.jsonl"],
         f"data error: {tmp_path / 'no_such_folder'}: cannot be read as a dataset: "),
        (data_prep.main, ["convert", "--data", str(bad), "--out", f"{out}.jsonl"],
         f"data error: {bad}: cannot be read as Parquet: ArrowInvalid: "),
        (data_prep.main, ["adacs", "--data", "no_such_org/no_such_dataset", "--out", f"{out}.jsonl"],
         "data error: no_such_org/no_such_dataset: cannot be read as a dataset: "),
        (ev.main, ["passrate", "--data", "no_such_org/no_such_dataset", "--model", str(tiny_ckpt), "--out", f"{out}.jsonl"],
         "data error: no_such_org/no_such_dataset: cannot be read as a dataset: "),
        (ev.main, ["--model", str(tiny_ckpt), "--data", "mathvista-testmini", "--out", str(out)],
         "data error: AI4Math/MathVista: cannot be read as a dataset: "),
        (ev.main, ["--model", str(tiny_ckpt), "--data", "no_such_org/no_such_dataset", "--out", str(out)],
         "data error: no_such_org/no_such_dataset: cannot be read as a dataset: "),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for fn, argv, message in cases:
        with pytest.raises(SystemExit) as err:
            fn(argv)
        msg = str(err.value.code)
        assert msg.startswith(message) and "\n" not in msg, (argv, msg)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv  # nothing written, --out not made


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_every_tool_checks_that_out_can_be_written_before_it_starts(where, tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """Before: eval.py, passrate, convert, adacs and demo wrote under a file or into a read-only folder only at the end
    (passrate after sampling every problem, adacs after curating) and ended in FileExistsError, NotADirectoryError or
    OSError; ares.py, into a read-only folder, in an OSError. Read-only is what os.access says (this test's user may
    be root, whom chmod does not stop), so the folder is made read-only by os.access's answer."""
    import eval as ev

    blocker = tmp_path / "blocker"
    if where == "under a file":
        blocker.write_text("a file")
    else:
        blocker.mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != blocker and real(p, mode, **kw))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in _rows(Path(demo_data["rl"]))))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(dict(r, correct=True, length=3)) + "\n" for r in _rows(Path(demo_data["rl"]))))
    cases = [
        (ares.main, ["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", demo_data["sft"], "--out",
                     str(blocker / "run")]),
        (ev.main, ["--model", str(tiny_ckpt), "--data", str(bench), "--out", str(blocker / "ev")]),
        (ev.main, ["passrate", "--model", str(tiny_ckpt), "--data", str(bench), "--out", str(blocker / "r.jsonl")]),
        (data_prep.main, ["convert", "--data", str(bench), "--out", str(blocker / "c.jsonl")]),
        (data_prep.main, ["adacs", "--data", str(pool), "--out", str(blocker / "a.jsonl")]),
        (data_prep.main, ["demo", "--out", str(blocker / "demo")]),
    ]
    why = "is a file, not a folder" if where == "under a file" else "is not writable (a read-only folder or file system)"
    for fn, argv in cases:
        with pytest.raises(SystemExit) as err:
            fn(argv)
        msg = str(err.value.code)
        assert msg == f"--out {argv[argv.index('--out') + 1]}: {blocker} {why}", (argv[:2], msg)
    assert (blocker.is_file() or not any(blocker.iterdir())) and not (tmp_path / "ares.lock").exists()


GRADERS_UNDER_CTRL_C = '''
import signal, sys, time
sys.path.insert(0, sys.argv[1])
import data_prep
seen = []
signal.signal(signal.SIGINT, lambda *a: seen.append(1))  # the trainer reports the Ctrl-C (ares.on_ctrl_c)
pool = data_prep.grader_pool(2)
print(" ".join(str(p.pid) for p in pool.procs), flush=True)
while not seen:
    time.sleep(0.05)
time.sleep(0.5)
print("alive" if all(p.poll() is None for p in pool.procs) else "dead", flush=True)
print(pool.map([("1/2", "0.5")], 5.0), flush=True)  # and still grading
'''


def test_grader_processes_ignore_ctrl_c_and_end_with_the_trainer(tmp_path):
    # README "Run folders, Ctrl-C and kills": a terminal's Ctrl-C reaches the whole process group; the graders ignore
    # it (the trainer says where it stopped), and they end when the trainer does, killed or not
    import signal

    script = tmp_path / "trainer.py"
    script.write_text(GRADERS_UNDER_CTRL_C)
    proc = subprocess.Popen([sys.executable, script, ROOT], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to every process of the foreground group
    assert proc.stdout.readline().strip() == "alive" and proc.stdout.readline().strip() == "[True]"
    assert proc.wait(timeout=30) == 0

    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too: it only waits for its exit status to be read
            return f.read().split(") ")[1].startswith("Z")

    deadline = time.time() + 10
    while not all(gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert all(gone(p) for p in pids), pids


@pytest.mark.parametrize("stage", ["coldstart", "aepo"])
def test_a_diverged_run_stops_with_one_line_and_saves_no_final_checkpoint(stage, tiny_ckpt, demo_data, tmp_path):
    """--lr 1e30: step 1's update breaks the weights, and every later loss is NaN. The run used to skip each such update
    and go on to save the broken weights as final/ with exit 0. Now three non-finite steps in a row stop it."""
    out = tmp_path / "out"
    data = demo_data["sft" if stage == "coldstart" else "rl"]
    extra = ["--group-size", "4", "--max-response-len", "32", "--keep-uniform-groups"] if stage == "aepo" else []
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", stage, "--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--steps", "8",
                   "--batch-size", "4", "--lr", "1e30", *extra])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    loss = "loss" if stage == "coldstart" else "grad_norm"
    finite = [r[loss] is not None and math.isfinite(r[loss]) for r in rows]
    assert finite == [True, False, False, False], rows  # step 1 trained; steps 2-4 were NaN, and 4 stopped the run
    # README (what is logged): skipped, the step's optimizer steps skipped (here one a step; the cold start: a bool)
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert {type(r["skipped"]) for r in rows} == {bool if stage == "coldstart" else int}
    assert str(err.value.code).startswith("step 4: the loss or gradient norm was not finite in 3 steps in a row: the run "
                                          "diverged and stopped (no final checkpoint); lower --lr"), err.value.code
    assert not (out / "final").exists()



def test_an_aepo_step_with_a_skipped_update_logs_a_nan_grad_norm(tiny_ckpt, demo_data, tmp_path):
    """grad_norm, the largest of a step's updates' norms: with two updates a step at --lr 1e30, the first trains and
    breaks the weights, the second's norm is NaN and skipped. max() kept the first's finite norm, so step 1 logged a
    finite grad_norm beside skipped 1. A hand-worked list for the rule, then the run."""
    nan = float("nan")
    assert ares.largest_norm([2.0, 3.0]) == 3.0 and ares.largest_norm([]) is None
    assert math.isnan(ares.largest_norm([1.0, nan])) and math.isnan(ares.largest_norm([nan, 1.0]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        ares.main(["--stage", "aepo", "--model", str(tiny_ckpt), "--data", str(demo_data["rl"]), "--out", str(out),
                   "--steps", "8", "--batch-size", "2", "--lr", "1e30", "--group-size", "2", "--max-response-len", "8",
                   "--keep-uniform-groups", "--minibatches", "2", "--log-samples-every", "0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(math.isnan(r["grad_norm"]) for r in rows if r["skipped"]) and rows[0]["skipped"] == 1, rows

def test_one_non_finite_step_is_skipped_and_three_in_a_row_stop_the_run():
    """The count behind the stop, against a hand-worked sequence: a lone NaN step (a bf16 spike) is skipped and the run
    goes on; the count restarts after a finite step, and is trainer state, so a resume continues it."""
    state, seen = {}, []
    for step, bad in enumerate([True, False, True, True, False, True, True], 1):
        ares.stop_if_diverged(state, step, bad, 1e-4)
        seen.append(state["nonfinite_steps"])
    assert seen == [1, 0, 1, 2, 0, 1, 2]
    resumed = json.loads(json.dumps(state))  # as a checkpoint's trainer state holds it
    with pytest.raises(SystemExit, match="^step 8: the loss or gradient norm was not finite in 3 steps in a row"):
        ares.stop_if_diverged(resumed, 8, True, 1e-4)


@pytest.mark.parametrize("tool", ["ares", "eval"])
def test_a_checkpoint_with_damaged_weights_is_one_line_naming_the_folder(tool, tiny_ckpt, demo_data, tmp_path):
    """A copy cut short (a full disk, an interrupted scp) gave safetensors' 30-line traceback in every tool."""
    import shutil

    import eval as evaluation

    model = tmp_path / "cut"
    shutil.copytree(tiny_ckpt, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        if tool == "ares":
            ares.main(["--stage", "coldstart", "--model", model, "--data", demo_data["sft"], "--out", out, "--steps", "1",
                       "--batch-size", "2"])
        else:
            evaluation.main(["--model", str(model), "--data", str(demo_data["test"]), "--out", str(out)])
    assert str(err.value.code) == (f"{model}: its weights could not be read (Error while deserializing header: incomplete "
                                   "metadata, file not fully covered): the folder is damaged or incomplete; copy it "
                                   "again, or give another checkpoint")
