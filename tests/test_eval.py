"""eval.py: metrics against hand-computed values; end to end on the tiny model (1 process == 2 processes, the
cache, failed records), two models side by side, and the plot."""
import importlib
import inspect
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script

import ares
import data_prep

ev = importlib.import_module("eval")  # `import eval` would shadow the builtin eval() here


def line(rid, correct, tokens, truncated=False, fmt=False, bucket=None, sample=0):
    return dict(id=rid, sample=sample, correct=correct, tokens=tokens, truncated=truncated, format_ok=fmt, bucket=bucket)


# Four records x 2 samples and one failed record; every value below is worked out by hand in the comments.
HAND = [  # id, bucket, (correct, tokens, truncated, format_ok) per sample
    ("e1", "easy", [(1, 10, 0, 1), (1, 20, 0, 1)]),
    ("e2", "easy", [(1, 30, 0, 1), (0, 40, 1, 0)]),
    ("h1", "hard", [(0, 50, 0, 0), (0, 100, 1, 0)]),
    ("h2", "hard", [(0, 60, 0, 1), (1, 70, 0, 0)]),
]


def hand_jsonl(path: Path) -> Path:
    with open(path, "w") as fh:
        for rid, bucket, samples in HAND:
            for k, (c, n, t, f) in enumerate(samples):
                fh.write(json.dumps(line(rid, bool(c), n, bool(t), bool(f), bucket, k)) + "\n")
    return path


def test_metrics_match_hand_computed_values_per_bucket_and_mean_at_n(tmp_path):
    responses = [json.loads(x) for x in open(hand_jsonl(tmp_path / "responses.jsonl"))]
    failed = [dict(id="e3", error="unreadable image", bucket="easy")]
    got = ev.summarize(responses, failed, samples=2, field_name="difficulty")
    # per-record accuracy a = e1 1, e2 .5, h1 0, h2 .5, e3 0 (failed counts as wrong); A = 2/5
    # SE = sqrt(sum (a - .4)^2 / (5 * 4)) = sqrt((.36 + .01 + .16 + .01 + .16) / 20) = sqrt(.035)
    # tokens 10 20 30 40 50 100 60 70: mean 380/8, median (40 + 50)/2; truncated 2/8; format 4/8
    # spread: sd = sqrt(mean squared distance to 47.5) = sqrt((37.5^2 + 27.5^2 + 17.5^2 + 7.5^2 + 2.5^2 + 12.5^2
    # + 22.5^2 + 52.5^2) / 8) = sqrt(5950 / 8); sorted 10 20 30 40 50 60 70 100, quartiles at positions 7/4 and 21/4:
    # 20 + .75 * 10 = 27.5 and 60 + .25 * 10 = 62.5, IQR 35
    assert got["overall"] == pytest.approx(dict(
        metric="mean@2", records=5, failed=1, responses=8, accuracy=0.4, accuracy_se=math.sqrt(0.035),
        mean_tokens=47.5, median_tokens=45.0, sd_tokens=math.sqrt(5950 / 8), iqr_tokens=35.0, truncated=0.25,
        format_ok=0.5))
    # easy: a = 1, .5, 0 -> A = .5, SE = sqrt(.5 / 6); tokens 10 20 30 40; truncated 1/4; format 3/4
    # spread: sd = sqrt((15^2 + 5^2 + 5^2 + 15^2) / 4) = sqrt(125); quartiles at 3/4 and 9/4: 17.5, 32.5 -> IQR 15
    assert got["buckets"]["easy"] == pytest.approx(dict(
        metric="mean@2", records=3, failed=1, responses=4, accuracy=0.5, accuracy_se=math.sqrt(0.5 / 6),
        mean_tokens=25.0, median_tokens=25.0, sd_tokens=math.sqrt(125), iqr_tokens=15.0, truncated=0.25,
        format_ok=0.75))
    # hard: a = 0, .5 -> A = .25, SE = sqrt(.125 / 2) = .25; tokens 50 100 60 70
    # spread: sd = sqrt((20^2 + 30^2 + 10^2 + 0^2) / 4) = sqrt(350); sorted 50 60 70 100: 57.5, 77.5 -> IQR 20
    assert got["buckets"]["hard"] == pytest.approx(dict(
        metric="mean@2", records=2, failed=0, responses=4, accuracy=0.25, accuracy_se=0.25,
        mean_tokens=70.0, median_tokens=65.0, sd_tokens=math.sqrt(350), iqr_tokens=20.0, truncated=0.25,
        format_ok=0.25))
    assert list(got["buckets"]) == ["easy", "hard"] and got["bucket_field"] == "difficulty"


def test_pass_at_1_standard_error_and_no_buckets():
    got = ev.summarize([line("a", True, 5), line("b", False, 7), line("c", True, 9), line("d", True, 3)], [])
    # A = 3/4; SE = sqrt((3 * .25^2 + .75^2) / (4 * 3)) = sqrt(.75 / 12) = .25; median of 3 5 7 9 = 6
    assert got["overall"]["metric"] == "pass@1" and got["buckets"] == {}
    assert got["overall"]["accuracy"] == pytest.approx(0.75) and got["overall"]["accuracy_se"] == pytest.approx(0.25)
    assert got["overall"]["mean_tokens"] == 6.0 and got["overall"]["median_tokens"] == 6.0


def test_pass_rate_buckets_use_spec_cutoffs():
    # App. G with 8 samples: easy = 6-8 correct, medium = 3-5, hard = 0-2
    assert [data_prep.pass_rate_bucket(k / 8) for k in range(9)] == ["hard"] * 3 + ["medium"] * 3 + ["easy"] * 3
    assert data_prep.pass_rate_bucket(2 / 3) == "easy" and data_prep.pass_rate_bucket(1 / 3) == "medium"
    rows = [dict(pass_rate=0.9), dict(pass_rate=None)]
    assert ev.bucket_field(rows, "auto") == "pass_rate"
    assert [ev.bucket_of(r, "pass_rate") for r in rows] == ["easy", "n/a"]
    assert ev.bucket_field([dict(level=2, difficulty="medium")], "auto") == "difficulty"
    assert ev.bucket_field([dict(level=2, difficulty="medium")], "level") == "level"
    assert ev.bucket_field([dict(question="q")], "auto") is None


def test_table_shows_models_side_by_side_with_differences(tmp_path):
    responses = [json.loads(x) for x in open(hand_jsonl(tmp_path / "responses.jsonl"))]
    a = ev.summarize(responses, [dict(id="e3", bucket="easy")], 2, "difficulty")
    b = ev.summarize([line(rid, True, 10, bucket=bk, sample=k) for rid, bk in
                      (("e1", "easy"), ("e2", "easy"), ("e3", "easy"), ("h1", "hard"), ("h2", "hard")) for k in (0, 1)],
                     [], 2, "difficulty")
    table = ev.bench_table("hand", {"A": a, "B": b}, ["A", "B"], "greedy")
    rows = {r.split()[0]: r.split() for r in table.splitlines()[2:6]}
    # label, n, acc A, acc B, Δ, tokens A, tokens B, Δ (relative); B is right everywhere with 10 tokens each
    assert rows["easy"] == ["easy", "3", "50.0", "100.0", "+50.0", "25.0", "10.0", "-15.0", "(-60%)"]
    assert rows["hard"] == ["hard", "2", "25.0", "100.0", "+75.0", "70.0", "10.0", "-60.0", "(-86%)"]
    assert rows["overall"] == ["overall", "5", "40.0", "100.0", "+60.0", "47.5", "10.0", "-37.5", "(-79%)"]
    assert "A" in table.splitlines()[2] and "B" in table.splitlines()[2] and "Δ" in table.splitlines()[2]
    # the length spread per bucket, sd / IQR (hand-computed in the test above); B writes 10 tokens everywhere: 0 / 0
    lines = table.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("response tokens, sd / IQR")))
    spread = {r.split()[0]: r.split()[1:] for r in lines[start + 2:start + 5]}
    assert spread == {"easy": ["11.2", "/", "15.0", "0.0", "/", "0.0"], "hard": ["18.7", "/", "20.0", "0.0", "/", "0.0"],
                      "overall": ["27.3", "/", "35.0", "0.0", "/", "0.0"]}


def test_a_failing_record_is_reported_not_fatal(monkeypatch):
    def fake(model, processor, ids, chunk, cfg, seed):
        if any(r["id"] == "bad" for r in chunk):
            raise RuntimeError("boom")
        return [dict(id=r["id"], sample=0) for r in chunk]

    monkeypatch.setattr(ev, "generate_chunk", fake)
    chunk = [dict(id=i) for i in ("a", "bad", "c")]
    lines, failures = ev.generate_or_report(None, None, None, chunk, ev.EvalConfig(), "bench")
    assert [x["id"] for x in lines] == ["a", "c"]
    assert failures == [dict(id="bad", error="generation failed: RuntimeError: boom")]


def test_an_out_of_memory_chunk_is_retried_one_record_at_a_time(monkeypatch):
    """README (bad input): a chunk whose generation runs out of memory is retried one record at a time; unlike a failed
    GPU (below), CUDA goes on after an out-of-memory error, so it must not end the evaluation."""
    sizes = []

    def fake(model, processor, ids, chunk, cfg, seed):
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [dict(id=r["id"], sample=0) for r in chunk]

    monkeypatch.setattr(ev, "generate_chunk", fake)
    lines, failures = ev.generate_or_report(None, None, None, [dict(id=i) for i in "abc"], ev.EvalConfig(), "bench")
    assert [x["id"] for x in lines] == ["a", "b", "c"] and failures == [] and sizes == [3, 1, 1, 1]


def test_a_failed_gpu_ends_the_evaluation_with_one_line(monkeypatch):
    """A device-side assert or an illegal memory access leaves CUDA unusable in the process: retrying record by record
    (as for an out-of-memory batch) made every later record a failure, counted wrong, and the table meaningless."""
    def fake(model, processor, ids, chunk, cfg, seed):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(ev, "generate_chunk", fake)
    with pytest.raises(SystemExit) as err:
        ev.generate_or_report(None, None, None, [dict(id="a"), dict(id="b")], ev.EvalConfig(), "math500")
    assert str(err.value.code) == ("eval: the GPU failed on benchmark math500 (RuntimeError: CUDA error: an illegal memory "
                                   "access was encountered): it cannot go on in this process. The responses so far are "
                                   "in --out's responses.jsonl: the same command continues from them")


def test_two_models_under_one_name_stop_before_anything_loads(full_size_model, tmp_path, capsys):
    """The metrics and the table file each model under its --name: with one name given twice, the second model's numbers
    replaced the first's, and the table showed the second model in both columns with a difference of 0."""
    with pytest.raises(SystemExit) as err:
        ev.parse_config(["--model", full_size_model, "--model", full_size_model, "--name", "a", "--name", "a",
                         "--data", "d.jsonl", "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "error: --name a given twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert ev.parse_config(["--model", full_size_model, "--model", full_size_model, "--name", "a", "--name", "b",
                            "--data", "d.jsonl", "--out", str(tmp_path / "out")]).name == ["a", "b"]

def test_column_mapping_goes_through_data_prep(tmp_path, full_size_model):
    path = tmp_path / "mapped.jsonl"
    path.write_text(json.dumps(dict(problem="What is 2*3?", final="6", uid="b", level=3)) + "\n")
    cfg = ev.parse_config(["--model", full_size_model, "--data", str(path), "--question-col", "problem", "--answer-col", "final",
                           "--id-col", "uid"])
    got = ev.load_benchmark(str(path), cfg)
    assert got["name"] == "mapped" and got["failures"] == []
    (rec,) = got["records"]
    assert (rec["id"], rec["question"], rec["answer"], rec["images"], rec["level"]) == ("b", "What is 2*3?", "6", [], 3)


def test_passrate_keeps_absolute_image_paths_absolute(tmp_path):
    """An image the data gave by an absolute path is written as that path (the output still opens it after a move); one
    given relative to the data file is written relative to the output file, as before. Traces as sample_traces returns."""
    from argparse import Namespace

    from PIL import Image

    (tmp_path / "my" / "imgs").mkdir(parents=True)
    for name, colour in (("abs", (200, 0, 0)), ("rel", (0, 0, 200))):
        Image.new("RGB", (28, 28), colour).save(tmp_path / "my" / "imgs" / f"{name}.png")
    data = tmp_path / "my" / "data.jsonl"
    data.write_text(json.dumps(dict(id="a", question="q", answer="1", images=[str(tmp_path / "my/imgs/abs.png")])) + "\n"
                    + json.dumps(dict(id="r", question="q", answer="1", images=["imgs/rel.png"])) + "\n")
    records = data_prep.load_source(str(data))
    traces = {i: [dict(response="\\boxed{1}", length=3, correct=True)] for i in range(2)}
    out = tmp_path / "pa" / "pool.jsonl"
    ev.write_pass_rates(records, traces, Namespace(k=1, keep_responses=True, out=str(out), max_prompt_len=9), world=1)
    images = {r["id"]: r["images"] for r in map(json.loads, open(out))}
    assert images == {"a": [str(tmp_path / "my/imgs/abs.png")], "r": ["../my/imgs/rel.png"]}
    moved = tmp_path / "elsewhere" / "pool.jsonl"
    moved.parent.mkdir()
    out.rename(moved)
    (rec,) = [r for r in data_prep.load_source(str(moved), limit=1)]  # "a" opens from anywhere
    assert rec["id"] == "a" and Image.open(rec["images"][0]).getpixel((0, 0)) == (200, 0, 0)


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny model: six demo records plus one with an unreadable image and one over-long prompt.


@pytest.fixture(scope="module")
def bench(demo_data, tmp_path_factory) -> Path:
    src = Path(demo_data["test"])
    rows = [json.loads(x) for x in open(src)][:6]
    for r in rows:
        r["images"] = [str(src.parent / p) for p in r["images"]]
    rows += [dict(rows[0], id="bad-image", images=[str(src.parent / "missing.png")]),
             dict(rows[1], id="too-long", question=rows[1]["question"] * 60)]
    path = tmp_path_factory.mktemp("bench") / "six.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_and_two_processes_agree_and_the_cache_is_reused(tmp_path, tiny_ckpt, bench, capsys):
    args = ["eval.py", "--model", tiny_ckpt, "--data", bench, "--max-new-tokens", 24, "--max-prompt-len", 512,
            "--temperature", 1.0, "--samples", 2, "--batch-size", 2]  # sampled, 3 chunks: 2 ranks share them
    run_script(args + ["--out", tmp_path / "one"])
    run_script(args + ["--out", tmp_path / "two"], nproc=2)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metrics"] == two["metrics"] and one["failures"] == two["failures"]
    lines = {d: [json.loads(x) for x in open(tmp_path / d / "responses.jsonl")] for d in ("one", "two")}
    assert {x["key"]: x["response"] for x in lines["one"]} == {x["key"]: x["response"] for x in lines["two"]}
    # the JSONL holds every response with its verdict; the JSON's numbers follow from it
    rs = lines["one"]
    assert len(rs) == 6 * 2 and {(x["id"], x["sample"]) for x in rs} == {(f"test-{i:05d}", k) for i in range(6) for k in (0, 1)}
    for x in rs:
        assert x["correct"] == data_prep.is_correct(data_prep.extract_boxed(x["response"]), x["answer"]) and 1 <= x["tokens"] <= 24
    (m,) = one["metrics"]["six"].values()  # one model
    assert m["overall"]["records"] == 8 and m["overall"]["failed"] == 2 and m["overall"]["metric"] == "mean@2"
    assert m["overall"]["mean_tokens"] == pytest.approx(sum(x["tokens"] for x in rs) / len(rs))
    assert m["overall"]["truncated"] == pytest.approx(sum(x["truncated"] for x in rs) / len(rs))
    assert sorted(m["buckets"]) == ["easy", "hard", "medium"]
    assert sum(b["records"] for b in m["buckets"].values()) == 8
    errors = {f["id"]: f["error"] for f in one["failures"]}
    assert set(errors) == {"bad-image", "too-long"} and "cannot be read" in errors["bad-image"]
    assert "--max-prompt-len 512" in errors["too-long"]
    # second run into the same folder (in this process: no start-up cost): nothing is generated, same numbers
    capsys.readouterr()
    ev.main([str(a) for a in args[1:]] + ["--out", str(tmp_path / "one")])
    rerun = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (rerun["generated"], rerun["cached"], one["generated"]) == (0, 12, 12)
    assert "12 responses from the cache, 0 generated" in capsys.readouterr().out
    assert rerun["metrics"] == one["metrics"]
    assert len(open(tmp_path / "one" / "responses.jsonl").readlines()) == 12


@pytest.fixture(scope="module")
def terse_ckpt(tmp_path_factory) -> Path:
    """The tiny model edited to answer at once: its end-of-turn embedding (tied to the output layer) is made the
    top logit wherever the random model would repeat '\\n', so its responses are 1 token instead of 24."""
    model, processor = ares.build_tiny(seed=0)
    tok = data_prep.tokenizer_of(processor)
    newline, eot = tok("\n", add_special_tokens=False)["input_ids"][0], tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[eot] = 1.05 * emb[newline]
    out = tmp_path_factory.mktemp("terse")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_a_checkpoint_saved_into_while_it_loads_stops_the_evaluation_instead_of_mixing_models(tmp_path, tiny_ckpt,
                                                                                               bench, monkeypatch):
    """eval.py named the weights (the cache key) after loading them: a training run that saved into the folder
    meanwhile filed the old weights' responses under the new weights' key, and the same command served them again
    as the new model's. Here the "save" lands while the model loads: one line, and nothing is cached."""
    import os
    import shutil

    model = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, model)
    load = ares.load_model

    def load_then_a_save_lands(path, *args, **kw):
        loaded = load(path, *args, **kw)
        os.utime(model / "config.json", (1, 1))  # the folder now holds other weights than the ones loaded
        return loaded

    monkeypatch.setattr(ares, "load_model", load_then_a_save_lands)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(model), "--data", str(bench), "--max-new-tokens", "4", "--out", str(tmp_path / "ev")])
    assert str(e.value.code) == (f"--model {model} changed while it loaded (a run saved a checkpoint into it): run the "
                                 "same command again once that save is done")
    assert not (tmp_path / "ev" / "responses.jsonl").read_text().strip()


def test_after_a_failed_gpu_the_same_command_continues_from_the_cached_responses(tmp_path, tiny_ckpt, bench,
                                                                                 monkeypatch):
    """The line a failed GPU ends eval.py with says the same command continues from the responses so far. Here the
    second chunk fails as a CUDA error would; the same command, run again, generates only the chunks after the first,
    and its results are those of a run that never failed."""
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--max-new-tokens", "8", "--batch-size", "2",
            "--temperature", "1.0"]
    results = lambda out: json.loads((Path(out) / "results.json").read_text())  # noqa: E731
    ev.main(args + ["--out", str(tmp_path / "clean")])
    clean = results(tmp_path / "clean")
    real, calls = ev.generate_chunk, []

    def second_chunk_fails(model, processor, ids, chunk, cfg, seed):
        calls.append([r["id"] for r in chunk])
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, processor, ids, chunk, cfg, seed)

    monkeypatch.setattr(ev, "generate_chunk", second_chunk_fails)
    out = str(tmp_path / "failed")
    with pytest.raises(SystemExit, match="the same command continues from them"):
        ev.main(args + ["--out", out])
    first = calls[0]
    calls.clear()
    monkeypatch.setattr(ev, "generate_chunk", lambda *a: calls.append([r["id"] for r in a[3]]) or real(*a))
    ev.main(args + ["--out", out])
    again = results(out)
    assert first not in calls and sum(map(len, calls)) == clean["generated"] - len(first)
    assert (again["cached"], again["generated"]) == (len(first), clean["generated"] - len(first))
    assert again["metrics"] == clean["metrics"] and again["failures"] == clean["failures"]


def test_two_models_side_by_side_then_compare_reads_the_cache(tmp_path, tiny_ckpt, terse_ckpt, bench, capsys):
    out = tmp_path / "eval"
    ev.main(["--model", str(tiny_ckpt), "--model", str(terse_ckpt), "--name", "tiny", "--name", "terse",
             "--data", str(bench), "--max-new-tokens", "24", "--batch-size", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]["six"]
    assert res["table"] in printed
    header, overall = res["table"].splitlines()[2].split(), res["table"].splitlines()[6].split()
    assert header == ["difficulty", "n", "tiny", "terse", "Δ", "tiny", "terse", "Δ"]
    dt = m["terse"]["overall"]["mean_tokens"] - m["tiny"]["overall"]["mean_tokens"]
    assert dt < 0 and overall[0] == "overall" and overall[7] == f"{dt:+.1f}"  # the terse model writes less
    assert m["tiny"]["overall"]["truncated"] == 1.0 and m["terse"]["overall"]["truncated"] == 0.0
    # compare() (what `python ares.py` calls) with the same settings: every response comes from the cache
    again = ev.compare([str(tiny_ckpt), str(terse_ckpt)], str(bench), out, names=["tiny", "terse"], max_new_tokens=24)
    assert again["generated"] == 0 and again["cached"] == 2 * 7 and again["table"] == res["table"]


def test_a_benchmark_line_that_is_not_an_object_is_a_failed_record(tmp_path, tiny_ckpt, demo_data):
    """A benchmark line `5` (valid JSON, not a record) is reported as a failed record, counted as wrong, and the rest is
    evaluated; before, bucketing the failures called 5.get() and eval.py ended in an AttributeError after the model
    had generated every response."""
    src = Path(demo_data["test"])
    rows = [dict(r, images=[str(src.parent / p) for p in r["images"]]) for r in map(json.loads, open(src))][:2]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "5\n")
    ev.main(["--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "ev"), "--max-new-tokens", "2"])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    (m,) = res["metrics"]["b"].values()
    assert m["overall"]["records"] == 3 and m["overall"]["failed"] == 1 and m["overall"]["responses"] == 2
    assert [(f["id"], f["error"]) for f in res["failures"]] == [("#2", "is 5, not an object with id, question, answer")]


def test_two_benchmark_files_of_one_name_are_numbered_both_and_sample_as_they_do_alone(tmp_path, tiny_ckpt, demo_data):
    """--data a/test.jsonl --data b/test.jsonl: test#1 and test#2 in the table and the JSON. Before, the names were
    counted while they were being changed, so the first became test#1 and the second kept the bare name, which reads
    as the first file's. Each still samples as it does when evaluated alone (its seed comes from the file's stem)."""
    src = Path(demo_data["test"])
    rows = [dict(r, images=[str(src.parent / p) for p in r["images"]]) for r in map(json.loads, open(src))]
    for sub, part in (("a", rows[:2]), ("b", rows[2:3])):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    flags = ["--model", str(tiny_ckpt), "--max-new-tokens", "3", "--temperature", "1"]
    ev.main(flags + ["--data", str(tmp_path / "a" / "test.jsonl"), "--data", str(tmp_path / "b" / "test.jsonl"),
                     "--out", str(tmp_path / "both")])
    res = json.loads((tmp_path / "both" / "results.json").read_text())
    assert list(res["metrics"]) == list(res["benchmarks"]) == ["test#1", "test#2"]
    assert [res["benchmarks"][n]["records"] for n in ("test#1", "test#2")] == [2, 1]
    assert "== test#1:" in res["table"] and "== test#2:" in res["table"]
    ev.main(flags + ["--data", str(tmp_path / "b" / "test.jsonl"), "--out", str(tmp_path / "alone")])
    responses = lambda out: sorted(json.loads(x)["response"] for x in open(tmp_path / out / "responses.jsonl")
                                   if json.loads(x)["id"] == rows[2]["id"])  # noqa: E731
    assert responses("both") == responses("alone")


def test_ctrl_c_says_where_the_responses_are_in_one_line(tmp_path, monkeypatch, full_size_model, capsys):
    """Exit 130 and one line, after the progress bar (closed first: left open, tqdm drew it again after the line as
    the process exited)."""
    from tqdm import tqdm

    def interrupted(cfg):
        bar = tqdm(total=4, desc="generating")  # the generation's bar, open when the Ctrl-C comes
        bar.update(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate_and_report", interrupted)
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", full_size_model, "--data", "d.jsonl", "--out", str(tmp_path / "ev")])
    assert e.value.code == 130  # as ares.py's Ctrl-C (it was 1, an error's)
    assert not list(tqdm._instances)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (Ctrl-C): the responses generated so far " \
        f"are in {tmp_path / 'ev' / 'responses.jsonl'}; the same command goes on from them"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_in_every_eval_command_is_one_line_on_rank_0_and_exit_130(rank, tmp_path, monkeypatch, capsys):
    """passrate is the long multi-GPU step of the pipeline: a Ctrl-C ended it in a KeyboardInterrupt traceback with
    exit -2 (and, as the evaluation's line, every rank said it under torchrun). Now one line on rank 0, exit 130; the
    evaluation, curves and demo-report the same (README: run folders)."""
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "run_passrate", interrupted)
    monkeypatch.setattr(ev, "run_curves", interrupted)  # README: curves and demo-report stop the same way
    monkeypatch.setattr(ev, "run_demo_report", interrupted)
    monkeypatch.setenv("RANK", rank)
    for argv in (["passrate", "--data", "d.jsonl", "--model", "tiny", "--out", str(tmp_path / "rates.jsonl")],
                 ["--model", "tiny", "--data", "d.jsonl", "--out", str(tmp_path / "ev")],
                 ["curves", str(tmp_path / "metrics.jsonl")], ["demo-report", str(tmp_path / "demo")]):
        monkeypatch.setattr(ev, "evaluate_and_report", interrupted)
        with pytest.raises(SystemExit) as e:
            try:
                ev.main(argv)
            except KeyboardInterrupt:  # the code before: a traceback
                pytest.fail("the Ctrl-C escaped as a KeyboardInterrupt")
        assert e.value.code == 130
        err = capsys.readouterr().err.strip().splitlines()
        if rank == "1":
            assert err == []
        elif argv[0] == "passrate":
            assert err[-1] == (f"interrupted (Ctrl-C): {tmp_path / 'rates.jsonl'} is as it was: passrate writes it once "
                               "every problem is sampled; the same command starts it again")
        elif argv[0] == "curves":
            assert err[-1] == "interrupted (Ctrl-C): the same command draws the curves"
        elif argv[0] == "demo-report":
            assert err[-1] == "interrupted (Ctrl-C): the same command writes the report"


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    responses = [json.loads(x) for x in open(hand_jsonl(tmp_path / "r.jsonl"))]
    results = dict(metrics={"hand": {"A": ev.summarize(responses, [], 2, "difficulty"),
                                     "B": ev.summarize(responses[:4], [], 2, "difficulty")}})
    assert ev.plot_results(results, tmp_path / "new" / "p.png")  # into a folder that does not exist yet
    data = (tmp_path / "new" / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert not ev.plot_results(dict(metrics={}), tmp_path / "p.png")
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("marker", ["files", "COMPLETE"])
def test_a_model_retrained_into_the_same_folder_is_never_served_the_old_responses(marker, tmp_path, tiny_ckpt,
                                                                                  terse_ckpt, bench):
    """The cache names a model by its folder AND the weights in it: after new weights are saved into the folder (a run
    retrained with --overwrite), the same eval command generates again and reports the new model (before, every
    response came from the cache: the old model's, silently)."""
    import shutil

    folder, out = tmp_path / "final", tmp_path / "eval"
    args = ["--model", str(folder), "--data", str(bench), "--max-new-tokens", "24", "--batch-size", "4", "--out", str(out)]
    shutil.copytree(tiny_ckpt, folder)
    if marker == "COMPLETE":  # one of ares.py's checkpoints: named by its save (a retrain saves the same step anew)
        (folder / "COMPLETE").write_text(json.dumps({"step": 3, "time": 1.0, "files": {}}))
    ev.main(args)
    before = json.loads((out / "results.json").read_text())
    shutil.rmtree(folder)
    shutil.copytree(terse_ckpt, folder)  # the terse model answers in 1 token where the tiny one writes 24
    if marker == "COMPLETE":
        (folder / "COMPLETE").write_text(json.dumps({"step": 3, "time": 2.0, "files": {}}))
    ev.main(args)
    after = json.loads((out / "results.json").read_text())
    if marker == "COMPLETE":
        assert [m["key"].endswith("@step3:2.0") for m in after["models"]] == [True]
    assert (before["generated"], after["generated"], after["cached"]) == (7, 7, 0)  # the 6 + "too-long" (under 4096)
    (b,), (a,) = before["metrics"]["six"].values(), after["metrics"]["six"].values()
    assert a["overall"]["mean_tokens"] < b["overall"]["mean_tokens"]
    ev.main(args)  # unchanged weights: all from the cache
    assert json.loads((out / "results.json").read_text())["cached"] == 7


def offline_hub_repo(tmp_path: Path, monkeypatch) -> Path:
    """A fake hub cache in tmp_path, offline, with the repository org/tiny and nothing in it yet (refs/ made): the
    folder that holds snapshots/<commit>/ and refs/main, as huggingface_hub lays out its own."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import: the module's own
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    return repo


def test_a_hub_model_whose_main_moved_is_never_served_the_old_commits_responses(tmp_path, tiny_ckpt, terse_ckpt,
                                                                                 bench, monkeypatch):
    """A hub name was the whole cache key: after a new commit to the repository, the same eval command served the old
    commit's responses as the new model's. Offline, on a fake hub cache (models--org--tiny: refs/main, one folder per
    commit under snapshots/): the responses are keyed by the commit, the new commit's model generates them again (the
    terse model answers in 1 token where the tiny one writes 24), and the unchanged commit is served from the cache."""
    import shutil

    repo, out = offline_hub_repo(tmp_path, monkeypatch), tmp_path / "eval"
    args = ["--model", "org/tiny", "--data", str(bench), "--max-new-tokens", "24", "--batch-size", "4", "--out", str(out)]
    results = []
    for commit, folder in (("a" * 40, tiny_ckpt), ("b" * 40, terse_ckpt), ("b" * 40, terse_ckpt)):
        if not (repo / "snapshots" / commit).exists():
            shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs" / "main").write_text(commit)
        ev.main(args)
        results.append(json.loads((out / "results.json").read_text()))
    assert [r["models"][0]["key"] for r in results] == ["org/tiny@" + "a" * 40] + ["org/tiny@" + "b" * 40] * 2
    assert [(r["generated"], r["cached"]) for r in results] == [(7, 0), (7, 0), (0, 7)]
    tokens = [next(iter(r["metrics"]["six"].values()))["overall"]["mean_tokens"] for r in results]
    assert tokens[1] < tokens[0] and tokens[1] == tokens[2]


def test_a_hub_model_is_read_at_the_commit_its_responses_are_cached_under_though_main_moves_meanwhile(
        tmp_path, tiny_ckpt, terse_ckpt, bench, monkeypatch):
    """The cache key names the commit main pointed to when the evaluation looked (ares.hub_commit); the weights are
    read at that commit too, not at whatever main points to a moment later: else a commit pushed between the two had
    its responses filed under the old commit's key. Here main moves to the terse model (1-token answers) right after
    the commit is taken: the responses are still the tiny model's (more than 1 token each)."""
    import shutil

    repo, out = offline_hub_repo(tmp_path, monkeypatch), tmp_path / "eval"
    for commit, folder in (("a" * 40, tiny_ckpt), ("b" * 40, terse_ckpt)):
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs" / "main").write_text("a" * 40)
    commit_of = ares.hub_commit

    def then_main_moves(*a, **kw):
        commit = commit_of(*a, **kw)
        (repo / "refs" / "main").write_text("b" * 40)
        return commit

    monkeypatch.setattr(ares, "hub_commit", then_main_moves)
    ev.main(["--model", "org/tiny", "--data", str(bench), "--max-new-tokens", "24", "--batch-size", "4", "--out",
             str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["models"][0]["key"] == "org/tiny@" + "a" * 40
    assert next(iter(res["metrics"]["six"].values()))["overall"]["mean_tokens"] > 1  # the terse model writes 1


def _own_bench(bench: Path, folder: Path) -> Path:
    """The usable records of `bench` (the 6 + "too-long") in `folder`, with their own copies of the images, so that a
    test can edit a record or an image in place."""
    import shutil

    folder.mkdir()
    rows = [json.loads(x) for x in open(bench) if json.loads(x)["id"] != "bad-image"]
    for r in rows:
        copies = []
        for im in r["images"]:
            copies.append(str(folder / f"{r['id']}-{Path(im).name}"))
            shutil.copy(im, copies[-1])
        r["images"] = copies
    path = folder / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_record_edited_in_place_is_generated_again_and_graded_against_its_new_answer(tmp_path, tiny_ckpt, bench):
    """The cache names a response by the record's content too (question, answer, image bytes): after one record's
    question and answer, and another's image, are edited in the same file, those two are generated again and graded
    against the new answer; the other five still come from the cache (before, all 7 did, with the old verdicts)."""
    from PIL import Image

    path, out = _own_bench(bench, tmp_path / "bench"), tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(path), "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out)]
    ev.main(args)
    rows = [json.loads(x) for x in open(path)]
    rows[1] = dict(rows[1], question="What is 40 + 2?", answer="42")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Image.open(rows[2]["images"][0]) as im:  # same size, one pixel changed
        im = im.convert("RGB")
        im.putpixel((0, 0), tuple(255 - c for c in im.getpixel((0, 0))))
        im.save(rows[2]["images"][0])
    ev.main(args)
    res = json.loads((out / "results.json").read_text())
    assert (res["generated"], res["cached"]) == (2, 5)
    edited = [json.loads(x) for x in open(out / "responses.jsonl")][-2:]  # the two lines this run appended
    assert sorted(x["id"] for x in edited) == sorted([rows[1]["id"], rows[2]["id"]])
    new = next(x for x in edited if x["id"] == rows[1]["id"])
    assert new["answer"] == "42" and new["correct"] == data_prep.is_correct(data_prep.extract_boxed(new["response"]), "42")
    ev.main(args)  # nothing changed since: all from the cache
    assert json.loads((out / "results.json").read_text())["cached"] == 7


@pytest.fixture(scope="module")
def not_tiny_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint without the mark of the tiny model: loaded as any other model (the pixel flags' defaults)."""
    import shutil

    real = tmp_path_factory.mktemp("not_tiny") / "model"
    shutil.copytree(tiny_ckpt, real)
    config = json.loads((real / "config.json").read_text())
    del config["ares_tiny"]
    (real / "config.json").write_text(json.dumps(config))
    return real


def test_the_pixel_flags_reach_the_image_processor_and_a_tiny_checkpoint_keeps_its_own_size_without_them(tiny_ckpt,
                                                                                                        not_tiny_ckpt,
                                                                                                        bench, tmp_path):
    """--min-pixels / --max-pixels were never applied to a tiny checkpoint, even when given, and the cache test above
    only checked its key. A 448 x 448 image is 32 x 32 patches of 14 px at the flags' defaults (1280 x 28 x 28 pixels
    at most); a tiny checkpoint resizes it to at most 112 x 112 pixels (8 x 8) unless a flag is given, in ares.py and
    eval.py alike."""
    from PIL import Image

    real = not_tiny_ckpt
    image = Image.new("RGB", (448, 448), "red")

    def grid(model, *flags, tool="ares"):
        if tool == "ares":
            cfg = ares.parse_config(["--stage", "aepo", "--model", str(model), "--data", str(bench), *flags])
        else:  # eval.py's flags, as run_benchmark's loading config takes them
            e = ev.parse_config(["--model", str(model), "--data", str(bench), "--out", str(tmp_path / "e"), *flags])
            cfg = ares.Config(min_pixels=e.min_pixels, max_pixels=e.max_pixels, given=e.given)
        processor = ares.processor_for(str(model), cfg)
        return processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist()

    small = ["--max-pixels", str(112 * 112)]
    for tool in ("ares", "eval"):
        assert grid(tiny_ckpt, tool=tool) == [[1, 8, 8]], tool  # its own size
        assert grid(tiny_ckpt, "--max-pixels", str(224 * 224), tool=tool) == [[1, 16, 16]], tool
        assert grid(real, tool=tool) == [[1, 32, 32]], tool  # the flags' defaults
        assert grid(real, *small, tool=tool) == [[1, 8, 8]], tool


def test_passrate_samples_the_image_tokens_of_its_pixel_flags_and_a_tiny_checkpoint_its_own_without_them(
        tiny, tiny_ckpt, not_tiny_ckpt, tmp_path, monkeypatch):
    """passrate had no --min-pixels / --max-pixels: it sampled at ares.py's defaults whatever training was given, so
    the pass rates behind AdaCS came from other images than the model trains on. The image tokens of the prompt it
    samples, counted by hand: Qwen2.5-VL resizes each side to a multiple of 28 px (a 14 px patch, 2 x 2 patches merged
    into one token) so that the area lies between the two bounds, one token per 28 x 28 cell."""
    from PIL import Image

    Image.new("RGB", (448, 448), "red").save(tmp_path / "red.png")
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(dict(id="a", question="What colour?", answer="red", images=[str(tmp_path / "red.png")])))
    pad = tiny[1].tokenizer.convert_tokens_to_ids("<|image_pad|>")

    class Sampled(Exception):
        pass

    def image_tokens(model, *flags) -> int:
        prompts = []

        def sample(model, batch, **kw):  # the prompts passrate samples, then stop
            prompts.extend(batch)
            raise Sampled

        monkeypatch.setattr(ares, "sample", sample)
        args = ev.passrate_parser().parse_args(["--data", str(data), "--model", str(model), "--k", "1", "--out",
                                                str(tmp_path / "rates.jsonl"), *flags])
        with pytest.raises(Sampled):
            ev.run_passrate(args)
        (prompt,) = prompts
        return int((prompt["ids"] == pad).sum())

    assert image_tokens(not_tiny_ckpt) == 16 * 16  # 448 px = 16 cells a side: inside the defaults (3136 to 1003520)
    assert image_tokens(not_tiny_ckpt, "--max-pixels", str(224 * 224)) == 8 * 8  # down to 224 px a side
    assert image_tokens(not_tiny_ckpt, "--min-pixels", str(896 * 896)) == 32 * 32  # up to 896 px a side
    assert image_tokens(tiny_ckpt) == 4 * 4  # its own 112 x 112 pixels at most
    assert image_tokens(tiny_ckpt, "--max-pixels", str(224 * 224)) == 8 * 8  # a flag given: the flag's


@pytest.mark.parametrize("flag", [["--max-pixels", str(64 * 28 * 28)], ["--min-pixels", str(28 * 28)],
                                  ["--dtype", "bf16"], ["--dtype", "fp16"], ["--attn", "eager"]])
def test_a_run_with_another_loading_flag_is_not_served_the_cached_responses(flag, tmp_path, tiny_ckpt, bench):
    """--max-pixels and --min-pixels change the image tokens the model reads, --dtype and --attn its arithmetic: a
    rerun that changes one generates again (before, every response came from the cache). --dtype fp16, which training
    refuses, evaluates (README: multi-GPU)."""
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--max-new-tokens", "4", "--batch-size", "8", "--out", str(out)]
    ev.main(args)
    ev.main(args + flag)
    assert json.loads((out / "results.json").read_text())["generated"] == 7
    ev.main(args + ["--dtype", "fp32"])  # what --dtype auto loads on the CPU: the same responses, from the cache
    assert json.loads((out / "results.json").read_text())["cached"] == 7


@pytest.mark.parametrize("sub", ["passrate", "curves", "demo-report"])
def test_each_subcommand_has_a_help_and_names_what_it_misses(sub, capsys):
    """Before, `eval.py curves --help` read a file called '--help' (FileNotFoundError), and `eval.py curves` or
    `eval.py demo-report` alone ended in an IndexError; passrate already parsed its flags."""
    with pytest.raises(SystemExit) as err:
        ev.main([sub, "--help"])
    assert err.value.code == 0 and capsys.readouterr().out.startswith(f"usage: eval.py {sub}")
    with pytest.raises(SystemExit) as err:
        ev.main([sub])
    assert err.value.code == 2 and "the following arguments are required" in capsys.readouterr().err


def test_the_main_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as err:
        ev.main(["--help"])
    printed = capsys.readouterr().out
    assert err.value.code == 0
    assert all(f"eval.py {sub} " in printed for sub in ("passrate", "curves", "demo-report")), printed


def test_curves_says_where_it_drew_them(tmp_path, capsys):
    """Before, a successful `eval.py curves` printed nothing, not even the file it wrote."""
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(dict(step=s, reward=0.1 * s, acc=0.1 * s, tau=1.0)) + "\n" for s in (1, 2, 3)))
    ev.main(["curves", str(metrics)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"curves: {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "curves.png").unlink()
    (tmp_path / "curves.png").mkdir()  # a folder of that name: an IsADirectoryError traceback after drawing
    with pytest.raises(SystemExit) as e:
        ev.main(["curves", str(metrics)])
    assert str(e.value.code) == f"curves {metrics}: {tmp_path / 'curves.png'} is a folder, where the curves are written: " \
                                "move it"


STOPS = [  # (case, argv, message): an argv starting with "ares" runs ares.py, else eval.py; {x} are bad_inputs' files
    # each was a traceback, or loaded the model (and evaluated garbage) before this check
    ("zero-row parquet", ["--data", "{zero}", "--model", "{model}", "--out", "{out}"],  # DatasetGenerationError
     "data error: {zero}: no records"),
    ("parquet without columns", ["--data", "{bare}", "--model", "{model}", "--out", "{out}"], "data error: {bare}: no records"),
    ("zero-row parquet, coldstart", ["ares", "--stage", "coldstart", "--data", "{zero}", "--model", "{model}", "--out",
                                     "{out}"], "data error: {zero}: no records"),
    ("an empty file", ["--data", "{empty}", "--model", "{model}", "--out", "{out}"],  # a table of "-"
     "data error: {empty}: no records"),
    ("every record bad", ["--data", "{allbad}", "--model", "{model}", "--out", "{out}"],  # pass@1 0.0%
     "data error: {allbad}: no usable record: all 2 failed their check, the first: record a: missing or empty field "
     "'question'"),
    ("a corrupt image in a saved dataset, passrate", ["passrate", "--data", "{saved}", "--model", "{model}", "--out",
                                                      "{out}/r.jsonl"],  # PIL's UnidentifiedImageError
     "data error: {saved}: row 1 (id b): image 0 (7 bytes) cannot be read: "),
    ("a corrupt image, coldstart --preset geometry3k", ["ares", "--stage", "coldstart", "--preset", "geometry3k", "--data",
                                                        "{saved}", "--model", "{model}", "--out", "{out}"],
     "data error: {saved} (preset geometry3k): row 1 (id b): image 0 (7 bytes) cannot be read: "),
    ("choices an int, passrate", ["passrate", "--data", "{choices}", "--model", "{model}", "--out", "{out}/r.jsonl"],
     "data error: {choices}: row 0 (id a): the choices (column 'choices') must be a list of options, got 5"),
    ("passrate --attn bogus", ["passrate", "--data", "{good}", "--model", "{model}", "--out", "{out}/r.jsonl", "--attn",
                               "bogus"], "eval.py passrate: error: argument --attn: invalid choice: 'bogus'"),
    ("passrate --attn flash_attention_2", ["passrate", "--data", "{good}", "--model", "{model}", "--out", "{out}/r.jsonl",
                                           "--attn", "flash_attention_2"],  # ImportError as the model loaded
     "--attn flash_attention_2 needs the optional package flash-attn"),
    ("passrate --max-pixels under --min-pixels", ["passrate", "--data", "{good}", "--model", "{model}", "--out",
                                                  "{out}/r.jsonl", "--min-pixels", "5000", "--max-pixels", "4000"],
     "--max-pixels must be >= --min-pixels, got 4000"),  # passrate had neither flag (the defaults, whatever training's)
    ("passrate --min-pixels 0", ["passrate", "--data", "{good}", "--model", "{model}", "--out", "{out}/r.jsonl",
                                 "--min-pixels", "0"], "--min-pixels must be >= 1, got 0"),
    ("passrate --temperature 0 --k 2", ["passrate", "--data", "{good}", "--model", "{model}", "--out", "{out}/r.jsonl",
                                        "--temperature", "0", "--k", "2"],  # K identical greedy samples
     "--k > 1 needs --temperature > 0"),
    ("--plot a folder", ["--data", "{good}", "--model", "{model}", "--out", "{out}", "--plot", "{tmp}"],  # IsADirectoryError
     "--plot {tmp}: a folder; give the PNG file to write"),  # after the whole evaluation
    ("--plot under a file", ["--data", "{good}", "--model", "{model}", "--out", "{out}", "--plot", "{good}/p.png"],
     "--plot {good}/p.png: {good} is a file, not a folder"),  # FileExistsError
    ("--plot of a format matplotlib cannot write", ["--data", "{good}", "--model", "{model}", "--out", "{out}", "--plot",
                                                    "{out}/responses.jsonl"],  # ValueError, after the whole evaluation
     "--plot {out}/responses.jsonl: matplotlib cannot write a .jsonl file; give a .png file"),
    ("curves on text values", ["curves", "{run}/aepo/metrics.jsonl"],  # TypeError
     'curves {run}/aepo/metrics.jsonl: step 1: reward is "x", not a number'),
    ("demo-report on files without their keys", ["demo-report", "{run}"],  # KeyError
     "demo-report {run}: eval_greedy/results.json lacks its 'table' text"),
    ("--demo on a demo.json without its keys", ["--demo", "{run}"],  # KeyError
     "--demo {run}: {run}/demo.json is not the report of a finished `python ares.py` run: KeyError: 'greedy'"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict:
    """STOPS' files: Parquet without rows, bad records, a saved dataset with a corrupt image, and a finished-looking
    run folder whose JSON files lack what the reports read and whose metrics hold text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data_prep import corrupt_image_dataset

    tmp = tmp_path_factory.mktemp("bad_inputs")
    files = dict(tmp=tmp, zero=tmp / "zero.parquet", bare=tmp / "bare.parquet", empty=tmp / "empty.jsonl",
                 allbad=tmp / "allbad.jsonl", choices=tmp / "choices.jsonl", good=tmp / "good.jsonl", run=tmp / "run",
                 saved=corrupt_image_dataset(tmp / "saved"))
    pq.write_table(pa.table(dict(id=pa.array([], pa.string()), question=pa.array([], pa.string()),
                                 answer=pa.array([], pa.string()))), files["zero"])
    pq.write_table(pa.table({}), files["bare"])
    files["empty"].write_text("")
    rows = dict(allbad=[dict(id="a", question="", answer="1"), dict(id="b", question="Q")],
                choices=[dict(id="a", question="Q", answer="1", choices=5)],
                good=[dict(id="a", question="What is 1 + 1?", answer="2")])
    for name, rs in rows.items():
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rs))
    for part in (*ev.DEMO_FILES, "demo.json", "eval_sampled/responses.jsonl"):
        (files["run"] / part).parent.mkdir(parents=True, exist_ok=True)
        (files["run"] / part).write_text("{}")
    (files["run"] / "aepo" / "metrics.jsonl").write_text(json.dumps(dict(step=1, reward="x")) + "\n")
    return files


@pytest.mark.parametrize("argv, message", [c[1:] for c in STOPS], ids=[c[0] for c in STOPS])
def test_bad_data_or_flags_stop_with_one_line_before_the_model_loads(argv, message, bad_inputs, full_size_model,
                                                                     tmp_path, monkeypatch, capsys):
    """One line naming the file, record and field (or the flag), before any model loads or output is made; --model is
    a folder without weights, so a load would end otherwise."""
    import importlib.util

    find_spec = importlib.util.find_spec  # flash-attn is never installed here, even where it is
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else find_spec(name, *a))
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    names = dict(bad_inputs, model=full_size_model, out=tmp_path / "out")
    argv = [a.format(**names) for a in argv]
    with pytest.raises(SystemExit) as err:
        (ares.main(argv[1:]) if argv[0] == "ares" else ev.main(argv))
    msg = err.value.code if isinstance(err.value.code, str) else capsys.readouterr().err.strip()  # argparse's: printed
    assert err.value.code != 0 and msg.startswith(message.format(**names)) and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def training_run(root: Path) -> tuple[Path, Path]:
    """A run folder of ares.py (its run record) holding a checkpoint final/ (COMPLETE): (run, final)."""
    run = root / "runs" / "x"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "coldstart"}}))
    (run / "final" / "COMPLETE").write_text(json.dumps({"step": 2, "files": {}}))
    return run, run / "final"


def test_passrate_replaces_its_out_only_with_overwrite_and_never_writes_into_a_run(tmp_path, monkeypatch):
    """passrate wrote over an --out that was there (the pass rates a curation was made from) without a word, and into a
    training run's folder beside its files; it took any suffix, and --out its own --data. Now each is one line naming
    --out, before the model loads, as data_prep.py's convert and adacs; --overwrite replaces an earlier output."""
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = tmp_path / "pool.jsonl"
    data.write_text(json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n")
    (rates := tmp_path / "rates.jsonl").write_text('{"id": "mine"}\n')
    run, final = training_run(tmp_path)
    cases = [(rates, [], f"--out {rates} exists: add --overwrite to replace it, or choose another --out"),
             (run / "metrics.jsonl", ["--overwrite"], f"--out {run / 'metrics.jsonl'}: {run} is the folder of a training "
              "run (its config.json is ares.py's run record), whose files are the run's: give a folder outside it"),
             (tmp_path / "rates.txt", [], f"--out {tmp_path / 'rates.txt'}: give a .jsonl or .parquet file (no stage "
              "reads a *.txt file)"),
             (data, ["--overwrite"], f"--out {data}: the same file as --data; give another output file")]
    for out, more, message in cases:
        with pytest.raises(SystemExit) as err:
            ev.main(["passrate", "--data", data, "--model", "tiny", "--k", "1", "--temperature", "0", "--out", out, *more])
        assert str(err.value.code) == message
    assert rates.read_text() == '{"id": "mine"}\n' and not (run / "metrics.jsonl").exists()
    assert not (tmp_path / "rates.txt").exists() and data.read_text().startswith('{"id": "a"')


def test_passrate_writes_an_out_given_with_a_tilde_where_its_checks_look(tmp_path, monkeypatch):
    """passrate --out=~/rates.jsonl (a shell expands no ~ after '='): data_prep.check_records_out read it as the home
    folder's, run_passrate wrote ./~/rates.jsonl, so the same command again replaced it without --overwrite. The
    writer now gets the path the checks read."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(ev, "run_passrate", lambda args: args.out)  # the path the records are written to
    data = tmp_path / "pool.jsonl"
    data.write_text(json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n")
    got = ev.main(["passrate", "--data", data, "--model", "tiny", "--k", "1", "--temperature", "0",
                   "--out=~/rates.jsonl"])
    assert Path(got) == home / "rates.jsonl"


def test_an_out_and_plot_given_with_a_tilde_are_the_home_folders_for_eval_and_the_trainer(tmp_path, demo_data,
                                                                                          monkeypatch):
    """--out=~/x and --plot=~/acc.png (a shell expands no ~ after '=') in eval.py and ares.py: their checks
    (check_clear_of_run, check_writable, ares.py's saved-model check) read the home folder's path, but the results and
    checkpoints went to ./~/x, so a run trained into ./~/runs/x was beyond the checks that keep eval.py's output out of
    its checkpoints, and data_prep.py now writes ~ as the home folder. Both now take the home folder's path."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(ev, "evaluate_and_report", lambda cfg: (cfg.out, cfg.plot))  # the paths written to
    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n")
    got = ev.main(["--model", "tiny", "--data", data, "--out=~/ev", "--plot=~/acc.png"])
    assert [Path(p) for p in got] == [home / "ev", home / "acc.png"]
    cfg = ares.parse_config(["--stage", "aepo", "--model", "tiny", "--data", str(demo_data["rl"]), "--out=~/runs/x"])
    assert Path(cfg.out) == home / "runs" / "x"


def test_a_model_and_data_given_with_a_tilde_are_read_from_the_home_folder(tmp_path, tiny_ckpt, demo_data, bench,
                                                                            monkeypatch):
    """--model=~/m and --data=~/d (a shell expands no ~ after '='), as --out: the checks read the home folder's path,
    but the loaders took '~/m' for a hub name (ares.py and eval.py: a traceback from from_pretrained and
    hf_hub_download; ares.py's --data: 'cannot be read as a dataset'). The trainer, the evaluation and passrate read
    them from $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    for name, target in (("m", tiny_ckpt), ("demo", demo_data["sft"].parent), ("six.jsonl", bench)):
        (home / name).symlink_to(target)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    ares.main(["--stage", "coldstart", "--model=~/m", "--data=~/demo/sft.jsonl", "--out=~/run", "--steps", "1",
               "--batch-size", "4", "--micro-batch-size", "4", "--max-prompt-len", "256", "--max-response-len", "128"])
    assert (home / "run" / "final" / "COMPLETE").is_file()
    ev.main(["--model=~/run/final", "--data=~/six.jsonl", "--out=~/ev", "--max-new-tokens", "4", "--batch-size", "4"])
    assert json.loads((home / "ev" / "results.json").read_text())["generated"] == 7
    ev.main(["passrate", "--model=~/m", "--data=~/six.jsonl", "--out=~/rates.jsonl", "--k", "1", "--temperature", "0",
             "--max-new-tokens", "4", "--limit", "2"])
    assert len((home / "rates.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("case", ["a run folder", "a run's own name", "--plot as a run's file", "a records file there",
                                  "another tool's results.json"])
def test_the_evaluation_writes_neither_into_a_run_nor_over_files_that_are_not_its_own(case, tmp_path, monkeypatch):
    """eval.py --out runs/x (a training run's folder) put responses.jsonl and results.json among the run's files; an
    --out whose responses.jsonl was a user's records had the responses appended to it, and a results.json of another
    tool was replaced. Now one line naming the flag and the file, before the model loads. An --out that holds eval.py's
    own cache still goes on from it (test_one_and_two_processes_agree_and_the_cache_is_reused)."""
    monkeypatch.setattr(ares, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = tmp_path / "bench.jsonl"
    data.write_text(json.dumps(dict(id="a", question="1 + 1?", answer="2")) + "\n")
    run, _ = training_run(tmp_path)
    out, plot = tmp_path / "eval", []
    if case == "a run folder":
        out, message = run, (f"--out {run}: it is the folder of a training run (its config.json is ares.py's run "
                             "record), whose files are the run's: give a subfolder of it, or a folder outside it")
    elif case == "a run's own name":  # a folder named as the run's next checkpoint, which that save would replace
        out, message = run / "step_00000004", (f"--out {run / 'step_00000004'}: {run} is the folder of a training run, "
                                              "which writes its own step_00000004 there: give another name")
    elif case == "--plot as a run's file":
        plot, message = ["--plot", run / "config.json"], (f"--plot {run / 'config.json'}: {run} is the folder of a "
                                                          "training run, which writes its own config.json there: give "
                                                          "another name")
    elif case == "a records file there":
        out.mkdir()
        (out / "responses.jsonl").write_text(data.read_text())
        message = (f"--out {out}: {out / 'responses.jsonl'} is not eval.py's cache (its first line is not a response "
                   "with a \"key\"), and the responses would be appended to it: move it, or choose another --out")
    else:
        out.mkdir()
        (out / "results.json").write_text('{"accuracy": 0.5}')
        message = (f"--out {out}: {out / 'results.json'} is not eval.py's results (no \"config\", \"metrics\" and "
                   "\"table\"), and the evaluation would replace it: move it, or choose another --out")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as err:
        ev.main(["--model", "tiny", "--data", data, "--out", out, *plot])
    assert str(err.value.code) == message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # a subfolder of the run (the README's ablations: --out X/eval) and a plot beside its files are not the run's
    assert ares.check_clear_of_run("--out", run / "eval") is None
    assert ares.check_clear_of_run("--plot", run / "acc.png", folder=False) is None


def test_another_tools_results_or_cache_sharing_one_of_their_keys_is_still_not_eval_pys(tmp_path):
    """check_eval_folder takes a results.json for eval.py's only with all of "config", "metrics" and "table", and a
    responses.jsonl only where its first line's "key" is text, as read_cache's lines are: another tool's results with
    a "config" of its own, or records with a numeric "key", were replaced or appended to. The cases above share no key
    with eval.py's files, so checking for any one of the three, or for a "key" of any kind, passed every test."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": {"lr": 3e-4}, "metrics": {"accuracy": 0.5}}))
    with pytest.raises(SystemExit, match="results.json is not eval.py's results"):
        ev.check_eval_folder(str(out))
    (out / "results.json").write_text(json.dumps({"config": {}, "metrics": {}, "table": ""}))
    ev.check_eval_folder(str(out))  # eval.py's own: replaced
    (out / "responses.jsonl").write_text(json.dumps({"key": 7, "question": "1 + 1?"}) + "\n")
    with pytest.raises(SystemExit, match="responses.jsonl is not eval.py's cache"):
        ev.check_eval_folder(str(out))


def test_a_cache_of_one_line_cut_short_is_still_the_evaluations_own(tmp_path):
    """A kill during eval.py's first append leaves responses.jsonl with one cut line: the same command goes on from it
    (a file of other JSON lines is not its cache)."""
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"key": "[\\"m\\", \\"b\\", \\"a\\", 0')
    assert ev.response_cache(cut) and not ev.response_cache(hand_jsonl(tmp_path / "responses.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    assert ev.response_cache(tmp_path / "empty.jsonl")
    (tmp_path / "notes.jsonl").write_text("my notes\nmore notes\n")  # a user's lines, none JSON: not a cut first line
    assert not ev.response_cache(tmp_path / "notes.jsonl")


# ----------------------------------------------------------------------------------------------------------
# README "Run folders, Ctrl-C and kills" and "Dependencies": the cache after a kill, its key, --plot through the
# command line, outputs written whole, and the version check. Four records of `bench` (--limit 4), a few tokens.


def _cache_lines(path: Path) -> list[dict]:
    """The responses a plain reader finds in responses.jsonl: each line that parses as JSON (no eval.py code)."""
    rows = []
    for text in path.read_text().splitlines():
        try:
            rows.append(json.loads(text))
        except ValueError:
            pass
    return rows


def test_a_response_line_cut_short_by_a_kill_is_skipped_and_only_that_response_is_generated_again(tmp_path, tiny_ckpt,
                                                                                                    bench, capsys):
    """A kill while responses.jsonl is appended to leaves its last line cut short: the next run skips that line,
    generates that one response again (greedy: the same line, byte for byte) on a line of its own, in place of the
    fragment, and takes the other three, untouched, from the cache; a third run generates nothing. A kill just before
    a line's newline leaves that line whole: it is kept, and ended before anything is appended."""
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "4", "--max-new-tokens", "4", "--batch-size",
            "2", "--out", str(out)]
    ev.main(args)
    cache = out / "responses.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 4  # 4 records x 1 greedy sample
    whole, last = lines[:3], lines[3]
    cache.write_text("".join(whole) + last[:len(last) // 2])  # the kill: half of the last line, no newline
    capsys.readouterr()
    ev.main(args)
    assert "3 responses from the cache, 1 generated" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert (res["generated"], res["cached"]) == (1, 3)
    assert cache.read_text() == "".join(whole) + last  # the three kept as they were; the cut one again, whole
    (m,) = res["metrics"]["six"].values()
    assert m["overall"]["records"] == 4 and m["overall"]["failed"] == 0
    ev.main(args)  # before, the new line was glued to the fragment: lost again, and generated once more here
    assert json.loads((out / "results.json").read_text())["generated"] == 0
    cache.write_text("".join(whole) + last.rstrip("\n"))  # the kill: after the last line's JSON, before its newline
    ev.main(args)
    assert (json.loads((out / "results.json").read_text())["generated"], cache.read_text()) == (0, "".join(whole) + last)


DECODING = ["--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "4"]


@pytest.mark.parametrize("flag, value", [("--temperature", "0.7"), ("--top-p", "0.9"), ("--max-new-tokens", "5")])
def test_a_run_with_other_decoding_settings_is_not_served_the_cached_responses(flag, value, tmp_path, tiny_ckpt, bench):
    """The cache key holds the decoding settings: changing --temperature, --top-p or --max-new-tokens generates all four
    responses again (appended: 4 + 4 lines), and going back to the first settings takes all four from the cache."""
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "4", "--batch-size", "4", "--out", str(out)]
    ev.main(args + DECODING)
    other = list(DECODING)
    other[other.index(flag) + 1] = value
    ev.main(args + other)
    res = json.loads((out / "results.json").read_text())
    assert (res["generated"], res["cached"]) == (4, 0)
    rows = _cache_lines(out / "responses.jsonl")
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    assert sorted(r["id"] for r in rows) == sorted(2 * [r["id"] for r in rows[:4]])  # the same 4 records, twice
    ev.main(args + DECODING)
    assert json.loads((out / "results.json").read_text())["cached"] == 4
    assert len(_cache_lines(out / "responses.jsonl")) == 8


def test_batch_size_is_not_in_the_cache_key_and_more_samples_add_only_the_missing_ones(tmp_path, tiny_ckpt, bench):
    """--batch-size and --samples are not in the key: another --batch-size takes every response from the cache, and
    --samples 3 after --samples 1 generates only samples 1 and 2 of each record (4 x 2), keeping the first ones."""
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "4", "--out", str(out)] + DECODING
    ev.main(args + ["--samples", "1", "--batch-size", "4"])
    first = (out / "responses.jsonl").read_text()
    ev.main(args + ["--samples", "1", "--batch-size", "1"])
    res = json.loads((out / "results.json").read_text())
    assert (res["generated"], res["cached"]) == (0, 4) and (out / "responses.jsonl").read_text() == first
    ev.main(args + ["--samples", "3", "--batch-size", "4"])
    res = json.loads((out / "results.json").read_text())
    assert (res["generated"], res["cached"]) == (8, 4)
    text = (out / "responses.jsonl").read_text()
    assert text.startswith(first)  # the first samples stay as they were
    ids = [r["id"] for r in map(json.loads, first.splitlines())]
    added = [(r["id"], r["sample"]) for r in map(json.loads, text[len(first):].splitlines())]
    assert sorted(added) == sorted((i, k) for i in ids for k in (1, 2))
    (m,) = res["metrics"]["six"].values()
    assert m["overall"]["metric"] == "mean@3" and m["overall"]["responses"] == 12


def test_a_response_graded_by_an_older_grader_is_graded_again_not_generated(tmp_path, tiny_ckpt, bench, monkeypatch):
    """Each cached response keeps what its verdict was taken with (`graded_by`: the grader's version, the record's
    options and precision). A response graded otherwise (an older grader, or a cache from before graded_by) is graded
    again from its text, with nothing generated, and the new verdict is appended; an up-to-date one is left alone."""
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "4", "--out", str(out)] + DECODING
    ev.main(args)
    lines = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["graded_by"] == [data_prep.GRADER_VERSION, [], None] for x in lines)
    for k, x in enumerate(lines):  # each response now holds its right answer; the stored verdict says wrong
        x.update(response=f"so \\boxed{{{x['answer']}}}", correct=False)
        if k < 2:
            x["graded_by"] = [1, [], None]
        elif k == 2:
            del x["graded_by"]
    (out / "responses.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    monkeypatch.setattr(ev, "generate_chunk", lambda *a: pytest.fail("generated again"))
    ev.main(args)
    res = json.loads((out / "results.json").read_text())
    (m,) = res["metrics"]["six"].values()
    assert (res["generated"], res["cached"]) == (0, 4) and m["overall"]["accuracy"] == 0.75  # 3 graded again: right
    again = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()][4:]
    assert [(x["id"], x["correct"], x["graded_by"][0]) for x in again] == [(x["id"], True, data_prep.GRADER_VERSION)
                                                                          for x in lines[:3]]


def test_a_glued_letter_graded_a_number_by_grader_3_is_graded_again_as_a_product(tmp_path, tiny_ckpt, monkeypatch):
    """Grader 3 read '5m' as 5 (math-verify drops m after a number); its cached verdicts are graded again by the grader
    that keeps the letter (README: '5x' and '5m' stay products), so a run's old 'right' for '5m' against 5 turns wrong
    with nothing generated. Were GRADER_VERSION still 3, the stale verdict would be served."""
    data = tmp_path / "five.jsonl"
    data.write_text(json.dumps(dict(id="a", question="What is 2 + 3?", answer="5")) + "\n")
    out = tmp_path / "eval"
    args = ["--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    ev.main(args)
    (x,) = [json.loads(y) for y in (out / "responses.jsonl").read_text().splitlines()]
    x.update(response="so \\boxed{5m}", correct=True, graded_by=[3, [], None])  # as grader 3 cached it
    (out / "responses.jsonl").write_text(json.dumps(x) + "\n")
    monkeypatch.setattr(ev, "generate_chunk", lambda *a: pytest.fail("generated again"))
    ev.main(args)
    res = json.loads((out / "results.json").read_text())
    (m,) = res["metrics"]["five"].values()
    assert (res["generated"], res["cached"], m["overall"]["accuracy"]) == (0, 1, 0.0)


def test_plot_flag_on_the_command_line_writes_a_png(tmp_path, tiny_ckpt, bench, capsys):
    """`eval.py ... --plot <file>` (through main, into a folder that does not exist yet): a PNG with something drawn on
    it, and the line that names it."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "plots" / "acc_vs_len.png"
    ev.main(["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "4", "--max-new-tokens", "4", "--out",
             str(tmp_path / "eval"), "--plot", str(png)])
    assert f"plot: {png}" in capsys.readouterr().out.splitlines()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    with Image.open(png) as im:
        assert len(im.convert("L").getcolors(maxcolors=1 << 16)) > 1  # not a blank canvas


def _crash_half_way(monkeypatch, cls, method: str, seen: list):
    """cls.method writes half of what it was given to a `.tmp` file, then dies as a kill would (KeyboardInterrupt)."""
    real = getattr(cls, method)

    def half(self, target, *args, **kw):
        where = Path(self if method == "write_text" else target)
        if not where.name.endswith(".tmp"):
            return real(self, target, *args, **kw)
        seen.append(where.name)
        if method == "write_text":
            where.write_bytes(target[:len(target) // 2].encode())
        else:  # Figure.savefig
            where.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, method, half)


def _results(tmp_path, ckpt, bench, tokens):
    ev.main(["--model", str(ckpt), "--data", str(bench), "--limit", "2", "--max-new-tokens", str(tokens), "--out",
             str(tmp_path / "eval")])


def _plot(tmp_path, ckpt, bench, tokens):
    ev.main(["--model", str(ckpt), "--data", str(bench), "--limit", "2", "--max-new-tokens", str(tokens), "--out",
             str(tmp_path / "eval"), "--plot", str(tmp_path / "plot" / "p.png")])


def _curves(tmp_path, ckpt, bench, tokens):
    metrics = tmp_path / "curves" / "metrics.jsonl"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_bytes("".join(json.dumps(dict(step=s, reward=s / tokens, acc=s / tokens, tau=1.0)) + "\n"
                                for s in range(1, 4)).encode())
    ev.main(["curves", str(metrics)])


def _explore(tmp_path, ckpt, bench, tokens):
    data = tmp_path / "explore" / "one.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_bytes(bench.read_bytes().splitlines(keepends=True)[0])
    cfg = ares.resolve_stage_defaults(ares.Config(group_size=2, branch_samples=1, micro_batch_size=2,
                                                  max_response_len=tokens), "aepo")
    ev.explore_page([ckpt], ["tiny"], data, tmp_path / "explore" / "explore.html", cfg, per_level=1)


OUTPUTS = [  # (output, where it is written, how it is written, the .tmp writer that dies half way)
    ("results.json", "eval/results.json", _results, ("pathlib", "write_text")),
    ("--plot", "plot/p.png", _plot, ("matplotlib", "savefig")),
    ("curves.png", "curves/curves.png", _curves, ("matplotlib", "savefig")),
    ("explore.html", "explore/explore.html", _explore, ("pathlib", "write_text")),
]


@pytest.mark.parametrize("what, name, command, crash", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_a_kill_mid_write_leaves_the_previous_eval_output_whole(what, name, command, crash, tmp_path, tiny_ckpt,
                                                                 bench, monkeypatch):
    """eval.py's outputs go to <name>.tmp and are renamed over the target: a kill half way through writing a new one
    (other settings, so other contents) leaves the previous file byte for byte, and no .tmp file beside it."""
    if crash[0] == "matplotlib":
        pytest.importorskip("matplotlib")
        from matplotlib.figure import Figure as cls
    else:
        cls = Path
    out = tmp_path / name
    command(tmp_path, tiny_ckpt, bench, 3)
    before = out.read_bytes()
    folder = sorted(p.name for p in out.parent.iterdir())
    seen = []
    with monkeypatch.context() as mp:
        _crash_half_way(mp, cls, crash[1], seen)
        with pytest.raises((KeyboardInterrupt, SystemExit)):  # eval.py's main turns Ctrl-C into its one line
            command(tmp_path, tiny_ckpt, bench, 5)
    assert seen == [out.name + ".tmp"]  # it did die while writing this output
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == folder  # no temporary file left beside it


def _pinned(package: str) -> str:
    """The version requirements.txt pins (the README: 'transformers >= 5.24.0 (the pinned version)')."""
    for text in (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().splitlines():
        if text.startswith(package + "=="):
            return text.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned in requirements.txt")


@pytest.mark.parametrize("sub", ["evaluation", "passrate"])
def test_eval_stops_with_one_line_when_transformers_is_too_old(sub, tmp_path, tiny_ckpt, bench, monkeypatch):
    """eval.py checks the installed transformers at start, as ares.py does: an older one than the pin (the device
    image's 5.17) stops it with one line naming the version needed and the one found, before anything is written."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.17.0" if name == "transformers" else real(name))
    out, need = tmp_path / "out", _pinned("transformers")
    argv = (["--model", str(tiny_ckpt), "--data", str(bench), "--limit", "1", "--max-new-tokens", "2", "--out", str(out)]
            if sub == "evaluation" else
            ["passrate", "--data", str(bench), "--limit", "1", "--model", str(tiny_ckpt), "--k", "1", "--max-new-tokens",
             "2", "--out", str(out / "rates.jsonl")])
    with pytest.raises(SystemExit) as err:
        ev.main(argv)
    msg = str(err.value.code)
    assert "\n" not in msg and msg.endswith(f"needs transformers >= {need}, found 5.17.0: "
                                            f"pip install 'transformers>={need}'"), msg
    assert not out.exists()


def test_explore_groups_sampled_together_keep_each_branch_in_its_own_group(tiny, bench):
    """explore_rows samples the groups of several problems in one rollout call: each group has G rows, and each
    branch names a fresh row of its own group (0 .. G-B-1) whose first branch_at tokens it repeats, token for token."""
    model, processor = tiny
    records = [json.loads(x) for x in open(bench)][:3]
    cfg = ares.resolve_stage_defaults(ares.Config(group_size=4, branch_samples=2, max_response_len=12,
                                                  entropy_quantile=0.5), "aepo")
    groups, tau = ev.explore_rows(model, processor, records, cfg, seed=0)
    assert len(groups) == 3 and all(len(rows) == 4 for rows in groups) and tau > 0
    branched = [(rows, r) for rows in groups for r in rows[2:] if r["parent"] >= 0]
    assert branched  # a random model is unsure everywhere: every group has its branch points
    for rows, r in branched:
        assert 0 <= r["parent"] < 2 and r["branch_at"] >= 1
        assert r["tokens"][:r["branch_at"]] == rows[r["parent"]]["tokens"][:r["branch_at"]]


def test_bucket_shares_sum_each_levels_groups_over_all_rows_and_the_first_half(tmp_path):
    """The demo report's "buckets" and "buckets_first_half" (App. G: how a level's groups move between the online
    buckets as training goes): per level, its groups in each bucket over all step rows, and over the first
    ceil(half) of them, as shares. A level with no groups has no shares. 5 rows, counted by hand below."""
    counts = [  # per step: easy-level groups (easy, medium, hard), hard-level groups (easy, medium, hard)
        ((2, 1, 0), (0, 0, 1)),
        ((1, 0, 1), (0, 1, 2)),
        ((3, 0, 0), (0, 0, 0)),
        ((0, 2, 2), (1, 1, 1)),
        ((0, 0, 4), (0, 0, 3)),
    ]
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for step, per_level in enumerate(counts, 1):
            row = {"step": step, "level_medium_len": 5.0, **{f"level_medium_groups_{b}": 0 for b in ares.BUCKETS}}
            for lv, groups in zip(("easy", "hard"), per_level):
                row[f"level_{lv}_len"] = 10.0
                row.update({f"level_{lv}_groups_{b}": n for b, n in zip(ares.BUCKETS, groups)})
            fh.write(json.dumps(row) + "\n")
    # all 5 rows: easy level 6, 3, 7 of 16; hard level 1, 2, 7 of 10
    assert ev.bucket_shares(path) == {
        "easy": {"easy": pytest.approx(6 / 16), "medium": pytest.approx(3 / 16), "hard": pytest.approx(7 / 16)},
        "medium": {"easy": None, "medium": None, "hard": None},
        "hard": {"easy": pytest.approx(0.1), "medium": pytest.approx(0.2), "hard": pytest.approx(0.7)}}
    # the first half: ceil(5 / 2) = 3 rows; easy level 6, 1, 1 of 8; hard level 0, 1, 3 of 4
    assert ev.bucket_shares(path, 0.5) == {
        "easy": {"easy": pytest.approx(6 / 8), "medium": pytest.approx(1 / 8), "hard": pytest.approx(1 / 8)},
        "medium": {"easy": None, "medium": None, "hard": None},
        "hard": {"easy": pytest.approx(0.0), "medium": pytest.approx(0.25), "hard": pytest.approx(0.75)}}


def test_a_training_preset_is_evaluated_on_its_test_split_and_a_benchmark_on_its_own(tmp_path, tiny_ckpt, demo_data,
                                                                                      monkeypatch):
    """`eval.py --data geometry3k` read the preset's own split, train: the problems --data hiyouga/geometry3k --preset
    geometry3k trains on, graded as if held out. A training preset is now read from its test split (ares.py's
    --eval-data reads the same, held_out_split), a benchmark preset from its own (MathVista: testmini), and --split
    still wins. A stand-in hub records which split each run asked for."""
    import datasets

    src = Path(demo_data["test"])
    rows = [json.loads(line) for line in open(src)][:2]
    part = datasets.Dataset.from_dict(
        {"problem": ["<image>" + r["question"] for r in rows], "answer": [r["answer"] for r in rows],
         "images": [[str(src.parent / im) for im in r["images"]] for r in rows], "id": ["a", "b"]},
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, **kw: asked.append(
        (name, split)) or part)
    for k, extra in enumerate([[], ["--split", "train"]]):
        ev.main(["--model", str(tiny_ckpt), "--data", "geometry3k", "--out", str(tmp_path / f"ev{k}"),
                 "--max-new-tokens", "2", *extra])
    assert asked == [("hiyouga/geometry3k", "test"), ("hiyouga/geometry3k", "train")]
    assert data_prep.held_out_split("mathvista-testmini") == "testmini"  # (virl39k: test_bad_input.py)
    # the cache key names the split read, so that responses cached when the default read train are not test's
    for extra, split in (([], "test"), (["--split", "train"], "train")):
        cfg = ev.parse_config(["--model", str(tiny_ckpt), "--data", "geometry3k", "--out", str(tmp_path / "k"), *extra])
        assert json.loads(ev.load_benchmark("geometry3k", cfg)["key"])["split"] == split


def test_curves_of_a_run_without_aepo_values_stop_with_one_line_instead_of_drawing_empty_panels(tmp_path, capsys):
    """A cold-start run's metrics.jsonl (loss, lr, grad_norm: step rows, none of the AEPO values) drew nine empty
    panels and said `curves: ...` as if it had drawn the run."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(dict(step=s, loss=1.0, lr=1e-5, grad_norm=0.5, skipped=0)) + "\n"
                               for s in (1, 2, 3)))
    with pytest.raises(SystemExit) as err:
        ev.main(["curves", str(metrics)])
    assert str(err.value.code) == (f"curves {metrics}: none of its 3 step rows has a value the curves draw (reward, acc, "
                                   "tau, ...): a cold-start run's log?; give an AEPO run's metrics.jsonl")
    assert not (tmp_path / "curves.png").exists()


def test_curves_of_a_single_step_draw_a_point(tmp_path):
    """A run of one AEPO step (or a log read after its first step) drew lines of one point each, which matplotlib shows
    as nothing: every panel was empty. Each value the run logged must put coloured pixels on the figure."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    def coloured_pixels(rows):
        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ev.main(["curves", str(metrics)])
        img = imread(tmp_path / "curves.png")[..., :3]  # (H, W, 3) in [0, 1]
        return int(((img.max(-1) - img.min(-1)) > 0.3).sum())  # C0, C1 ... lines; black text and white excluded

    # the legends' colour samples are the same in both: only the two more values can add pixels
    assert coloured_pixels([dict(step=1, reward=0.5, acc=0.4, tau=1.0)]) > coloured_pixels([dict(step=1, reward=0.5)]) + 20


def test_a_bad_row_with_the_id_of_a_good_record_leaves_that_record_counted(tmp_path, tiny_ckpt, demo_data):
    """A bad row under the id of a usable record (the record listed twice, one copy without its answer) is one failed
    record, counted wrong, beside that record's own response. Before, the failure's id hid the usable record's
    responses from the metrics: 2 records with 1 response instead of 3 with 2, and the record took the bad row's level."""
    src = Path(demo_data["test"])
    rows = [dict(r, images=[str(src.parent / p) for p in r["images"]]) for r in map(json.loads, open(src))][:2]
    bad = dict(rows[0], answer="", difficulty="bad copy")
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [bad, *rows]))
    ev.main(["--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "ev"), "--max-new-tokens", "2"])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    (m,) = res["metrics"]["b"].values()
    assert (m["overall"]["records"], m["overall"]["failed"], m["overall"]["responses"]) == (3, 1, 2)
    want = {}  # per level: records, failed, responses, counted by hand from the three rows
    for r, failed in ((bad, 1), (rows[0], 0), (rows[1], 0)):
        n = want.setdefault(str(r["difficulty"]), [0, 0, 0])
        n[0], n[1], n[2] = n[0] + 1, n[1] + failed, n[2] + 1 - failed
    assert {lv: [b["records"], b["failed"], b["responses"]] for lv, b in m["buckets"].items()} == want


def test_a_record_whose_generation_fails_is_counted_wrong_without_responses(tmp_path, tiny_ckpt, demo_data,
                                                                             monkeypatch):
    """A record whose generation raises (not a GPU failure: that ends the run) is one failed record, counted wrong, with
    no response; the others are evaluated. By hand: 3 records, the middle one failing -> 3 records, 1 failed, 2
    responses. The only tests of such a failure called generate_or_report by hand, never through the evaluation."""
    src = Path(demo_data["test"])
    rows = [dict(r, images=[str(src.parent / p) for p in r["images"]]) for r in map(json.loads, open(src))][:3]
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = ev.generate_chunk

    def fails_on_the_second(model, processor, ids, chunk, cfg, seed):
        if any(r["id"] == rows[1]["id"] for r in chunk):
            raise RuntimeError("boom")
        return real(model, processor, ids, chunk, cfg, seed)

    monkeypatch.setattr(ev, "generate_chunk", fails_on_the_second)
    ev.main(["--model", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "ev"), "--max-new-tokens", "2"])
    (m,) = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]["b"].values()
    assert (m["overall"]["records"], m["overall"]["failed"], m["overall"]["responses"]) == (3, 1, 2)
    cached = [json.loads(line)["id"] for line in open(tmp_path / "ev" / "responses.jsonl")]
    assert sorted(cached) == sorted([rows[0]["id"], rows[2]["id"]])


def test_trace_styles_count_each_cached_response_once_with_its_latest_verdict(tmp_path):
    """The --demo summary's trace styles read eval_sampled/responses.jsonl, eval.py's cache: a response graded again
    (a newer grader) is appended under its key, and the last line of a killed rerun is cut short. Each response counts
    once, with its last verdict, as the cache reads it; before, both verdicts were pooled and a cut line ended the
    summary in a JSONDecodeError traceback. By hand: ARES wrote 2 steps responses on the easy level, graded wrong, then
    both graded again right: 100% right, not 50%; the cold start 1 terse (right) and 1 steps (wrong): 50% / 50%."""
    run = tmp_path / "seed0"
    (run / "data").mkdir(parents=True)
    (run / "eval_sampled").mkdir()
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(dict(id=i, difficulty="easy")) + "\n" for i in "ab"))
    steps, terse = "<think>Red is 3.</think> \\boxed{3}", "<think></think> \\boxed{3}"
    lines = [dict(key=f"ARES {i}", id=i, model="ARES", correct=False, response=steps) for i in "ab"]
    lines += [dict(x, correct=True) for x in lines]  # graded again
    lines += [dict(key="cold a", id="a", model="cold start", correct=True, response=terse),
              dict(key="cold b", id="b", model="cold start", correct=False, response=steps)]
    (run / "eval_sampled" / "responses.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "GR')
    got = ev.style_lines([str(run)], ["easy"])
    assert got[-1] == "easy | 50% (100%) / 0% / 0% | 50% (0%) / 100% (100%) / 0% | 0% / 0% / 0%"


def test_a_cache_line_that_is_json_but_not_a_response_is_skipped_as_a_cut_line_is(tmp_path):
    """responses.jsonl lines that parse but are no response line of eval.py (a list, a number, an object whose key is
    not text: a damaged or hand-edited cache) are skipped, as a line cut short is, and those responses generated again.
    Before, read_cache ended eval.py (and the --demo summary's trace styles) in a TypeError traceback, and a byte that
    is not UTF-8 in a UnicodeDecodeError."""
    path = tmp_path / "responses.jsonl"
    good = dict(key="k", id="a", correct=True)
    path.write_bytes(b'{"key": "k3", "id": \xff}\n[1, 2]\n5\n' + json.dumps(dict(key=["k"], id="b")).encode() + b"\n"
                     + json.dumps(good).encode() + b'\n{"key": "k2"')  # a damaged byte, not UTF-8, too
    assert ev.read_cache(path) == {"k": good}
    # a damaged byte inside a text value still parses once replaced by U+FFFD: the line is damaged all the same (eval.py
    # writes ASCII), so it is skipped too, and that response generated again, not served with a character it never had
    with open(path, "ab") as f:
        f.write(b'\n{"key": "k4", "id": "c", "response": "caf\xe9", "correct": true}\n')
    assert ev.read_cache(path) == {"k": good}


def test_bucket_shares_read_a_null_group_count_as_a_gap_as_the_report_check_lets_it_pass(tmp_path):
    """demo-report's check (curve_problem) passes a null in a metrics.jsonl as a gap, the bucket shares included; the
    shares then summed it and ended the report in a TypeError traceback. By hand: easy level, step 1 null / 1 / 1,
    step 2 2 / 0 / 0 -> 2, 1, 1 of 4 groups."""
    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=1, level_easy_len=3.0, level_easy_groups_easy=None, level_easy_groups_medium=1,
                 level_easy_groups_hard=1),
            dict(step=2, level_easy_len=3.0, level_easy_groups_easy=2, level_easy_groups_medium=0, level_easy_groups_hard=0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ev.curve_problem(rows) is None
    assert ev.bucket_shares(path) == {"easy": {"easy": 0.5, "medium": 0.25, "hard": 0.25}}


def test_demo_on_a_folder_without_the_report_names_what_it_lacks_in_a_whole_sentence(tmp_path):
    """--demo on a run folder that stopped before its report: one line naming the missing file. It ended in '... of a
    finished `python ares.py`', the word 'run' missing (demo-report's line says 'run')."""
    with pytest.raises(SystemExit) as err:
        ev.main(["--demo", str(tmp_path)])
    assert str(err.value.code) == (f"--demo {tmp_path}: no demo.json in it; give the --out folder of a finished "
                                   "`python ares.py` run")


def test_demo_with_a_model_or_data_stops_instead_of_ignoring_them(tmp_path, capsys):
    """`--demo` prints the summary of demo runs and evaluates nothing: with --model and --data as well it printed that
    summary alone, the evaluation asked for silently not run. Either flag alone stops it too."""
    for extra in (["--model", "tiny", "--data", str(tmp_path / "b.jsonl")], ["--model", "tiny"],
                  ["--data", str(tmp_path / "b.jsonl")]):
        with pytest.raises(SystemExit) as err:
            ev.parse_config(["--demo", str(tmp_path), *extra])
        assert err.value.code == 2
        assert ("error: --demo prints the summary of demo runs and evaluates nothing: give it without --model and "
                "--data" in capsys.readouterr().err), extra


def test_demo_summary_of_one_run_says_1_seed_and_no_sd(tmp_path):
    """eval.py --demo of one run printed '1 seeds' and '± 0.0' in every cell, as if seeds had agreed: now '1 seed' and
    '± n/a'; the same run given twice is 2 seeds that agree, '± 0.0'. A hand-made run: one level, every model at 50%
    accuracy and 10 tokens."""
    run = tmp_path / "seed0"
    row = dict(accuracy=0.5, mean_tokens=10.0, sd_tokens=2.0)
    rep = {mode: {"metrics": {"test": {m: {"buckets": {"easy": row}, "overall": row} for m in ev.DEMO_MODELS}}}
           for mode in ("greedy", "sampled")}
    for part, text in (("demo.json", json.dumps(dict(rep, times={"coldstart": 1.0}, buckets={}, buckets_first_half={},
                                                      grpo_buckets={}))),
                       ("data/test.jsonl", json.dumps(dict(id="a", difficulty="easy")) + "\n"),
                       ("eval_sampled/responses.jsonl", "")):
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        (run / part).write_text(text)
    for runs, seeds, sd in (([run], "1 seed", "n/a"), ([run, run], "2 seeds", "0.0")):
        lines = ev.demo_summary([str(r) for r in runs]).splitlines()
        assert [x.split(",")[-2] for x in lines if x.startswith(("greedy,", "T = 1, mean@4,"))] == [f" {seeds}"] * 2
        easy = next(x for x in lines if x.startswith("easy | "))
        assert easy.startswith(f"easy | 50.0 ± {sd} / 50.0 ± {sd} / 50.0 ± {sd} | +0.0 ± {sd} | +0.0 ± {sd} | "
                               f"10.0 ± {sd} / 10.0 ± {sd} / 10.0 ± {sd}"), easy


def test_mean_sd_over_seeds_is_the_sample_sd_and_one_seed_has_none():
    """The demo tables' cells: 0.5 and 0.7 at scale 100 are 60.0 ± 14.1 (sample sd sqrt(0.02) = 0.1414); one seed printed
    '± 0.0', as if seeds had agreed, and is now '± n/a'."""
    assert ev.mean_sd([0.5, 0.7], 100) == "60.0 ± 14.1" and ev.mean_sd([0.1, -0.3], 100, signed=True) == "-10.0 ± 28.3"
    assert ev.mean_sd([0.5], 100) == "50.0 ± n/a" and ev.mean_sd([0.02], 100, signed=True) == "+2.0 ± n/a"


DEMO_RUN = ["data/test.jsonl", "coldstart/final", "aepo/config.json", "aepo/metrics.jsonl", "aepo/final",
            "grpo/metrics.jsonl", "eval_greedy/results.json", "eval_sampled/results.json"]  # run_demo's, in its order


@pytest.mark.parametrize("done, stage", [(1, "coldstart"), (3, "aepo"), (5, "aepo"), (7, "eval")])
def test_demo_report_of_a_stopped_demo_names_the_stage_that_did_not_finish(done, stage, tmp_path):
    """demo-report on a demo that stopped named the first file of its own list that was missing (eval_greedy's
    results.json, whichever stage had stopped) and said to give a finished run's folder: it now names the stage of
    run_demo whose output is missing and how to go on (the demo starts over with --overwrite). GRPO's log is the
    AEPO stage's too (ARES and GRPO run side by side there): no case stopped between them, so DEMO_FILES naming a
    'grpo' stage that run_demo does not have passed."""
    for part in DEMO_RUN[:done]:  # what run_demo left when it stopped (the AEPO stage runs ARES and GRPO side by side)
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("{}")
    with pytest.raises(SystemExit) as err:
        ev.main(["demo-report", str(tmp_path)])
    assert str(err.value.code) == (f"demo-report {tmp_path}: the demo stopped before its {stage} stage finished (no "
                                   f"{DEMO_RUN[done]}): run it again with --overwrite (the same `python ares.py` "
                                   "command; it starts over and ends with this report)")


def demo_rows(steps: int = 3, held_out: bool = False) -> list[dict]:
    """An AEPO run's metrics rows as the demo logs them: per level (easy, medium, hard) and per online bucket."""
    levels = ("easy", "medium", "hard")
    return [dict(step=s, reward=0.5, acc=0.5, tau=1.0,
                 **{f"level_{lv}_{k}": 1.0 for lv in levels for k in ("len", "n_he", "acc")},
                 **{f"level_{lv}_groups_{b}": 1 for lv in levels for b in ares.BUCKETS},
                 **{f"{k}_{b}": 0.5 for k in ("kappa", "n_he", "branched", "kl_outside") for b in ares.BUCKETS},
                 **({"eval_test_acc": 0.5, "eval_test_len": 9.0} if held_out else {})) for s in range(1, steps + 1)]


def test_the_demos_curves_are_the_readmes_nine_panels_ares_solid_and_grpo_dashed(tmp_path, monkeypatch):
    """README "What `python ares.py` does": curves.png has nine panels over the AEPO steps, ARES solid and GRPO dashed:
    reward and accuracy; per level response tokens, N_HE and accuracy; tau; kappa; per online bucket N_HE per response,
    the branched share and the KL outside HWE windows; a run with --eval-data two more (held-out accuracy and tokens).
    demo_report draws ARES's run first (solid), GRPO's second, and explore.html from the cold start and ARES, two
    held-out problems per level."""
    pytest.importorskip("matplotlib")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert ("`curves.png` has nine panels over the AEPO steps, ARES solid and GRPO dashed: reward and accuracy; per "
            "level response tokens, N_HE and accuracy; tau; kappa; and per online bucket (App. G) N_HE per response, "
            "the share of responses that were branched from an HWE token, and the KL outside HWE windows (the controller's "
            "signal). A run with `--eval-data` gets two more panels (held-out accuracy and tokens).") in readme
    levels, buckets = ("easy", "medium", "hard"), ares.BUCKETS
    nine = [["reward", "acc"], [f"{lv}_len" for lv in levels], [f"{lv}_n_he" for lv in levels],
            [f"{lv}_acc" for lv in levels], ["tau"], [f"kappa_{b}" for b in buckets], [f"n_he_{b}" for b in buckets],
            [f"branched_{b}" for b in buckets], [f"kl_outside_{b}" for b in buckets]]
    figures = []
    monkeypatch.setattr(ev, "save_figure", lambda plt, fig, png: figures.append(fig) or True)
    for held_out, panels in ((False, nine), (True, [*nine, ["test_acc"], ["test_len"]])):
        runs = {}
        for name in ("ARES", "GRPO"):
            runs[name] = tmp_path / f"{name}{held_out}.jsonl"
            runs[name].write_text("".join(json.dumps(r) + "\n" for r in demo_rows(held_out=held_out)))
        ev.plot_curves(runs, tmp_path / "curves.png")
        drawn = [ax for ax in figures[-1].axes if ax.axison]  # the grid's spare cells are switched off
        assert len(drawn) == len(panels) == (11 if held_out else 9)
        for ax, keys in zip(drawn, panels):
            assert ax.get_xlabel() == "AEPO step"
            labelled = {line.get_label(): line.get_linestyle() for line in ax.get_lines()
                        if not line.get_label().startswith("_")}  # the moving means (and points), not the faint steps
            assert labelled == {f"{k} ({name})": style for name, style in (("ARES", "-"), ("GRPO", "--")) for k in keys}
    assert inspect.signature(ev.explore_page).parameters["per_level"].default == 2  # two problems per level
    drawn, explored = [], []
    monkeypatch.setattr(ev, "plot_curves", lambda runs, png: drawn.append(list(runs.items())))
    monkeypatch.setattr(ev, "explore_page", lambda models, names, data, html, cfg, **kw: explored.append(
        (models, names, data, kw)))
    out = tmp_path / "demo"
    for part, text in (("eval_greedy/results.json", '{"table": "g"}'), ("eval_sampled/results.json", '{"table": "s"}'),
                       ("stage_times.json", '{"data": 1}'), ("aepo/config.json", '{"flags": {"stage": "aepo"}}'),
                       ("aepo/metrics.jsonl", runs["ARES"].read_text()),
                       ("grpo/metrics.jsonl", runs["GRPO"].read_text())):
        (out / part).parent.mkdir(parents=True, exist_ok=True)
        (out / part).write_text(text)
    ev.demo_report(out)
    assert drawn == [[("ARES", out / "aepo" / "metrics.jsonl"), ("GRPO", out / "grpo" / "metrics.jsonl")]]
    assert explored == [([out / "coldstart" / "final", out / "aepo" / "final"], ["cold start", "ARES"],
                         out / "data" / "test.jsonl", {})]


def test_explore_html_is_the_readmes_page(tmp_path, monkeypatch):
    """README "Where ARES explores": for two held-out problems per level, one branching rollout group of each model side
    by side, a model's six groups sampled in one call (one tau, printed beside each model); every token shaded by its
    window entropy, HWE tokens outlined, a branch's inherited prefix faded and its branch point marked, with the
    verdict, length and N_HE of every response; one self-contained file (no scripts, nothing loaded from elsewhere).
    The model and its sampler are stand-ins here: one group of hand-made rows (explore_rows is tested above)."""
    records = [dict(id=f"{lv}{i}", question=f"q {lv} {i}", answer="7", difficulty=lv, images=[])
               for lv in ("easy", "medium", "hard") for i in range(3)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    group = [dict(tokens=["So", "<b>"], hbar=[0.5, 2.0], hwe=[False, True], parent=-1, branch_at=0, correct=True,
                  n_he=1),
             dict(tokens=["So", "x"], hbar=[0.5, 0.1], hwe=[False, False], parent=0, branch_at=1, correct=False,
                  n_he=0)]  # a group of G = 2: one sampled, one branched from it at its second token
    calls = []

    class Model:
        def eval(self):
            return self

    def rows(model, processor, picked, cfg, seed):
        calls.append(([r["id"] for r in picked], seed))
        return [group] * len(picked), 0.5 if len(calls) == 1 else 1.0  # tau: the cold start's 0.5, ARES's 1.0

    monkeypatch.setattr(ares, "load_model", lambda name, cfg, device: (Model(), None))
    monkeypatch.setattr(ev, "explore_rows", rows)
    page = ev.explore_page(["cold", "ares"], ["cold start", "ARES"], data, tmp_path / "explore.html",
                           ares.Config(seed=3, group_size=2, branch_samples=1)).read_text()
    picked = ["easy0", "easy1", "medium0", "medium1", "hard0", "hard1"]
    assert calls == [(picked, 3), (picked, 3)]  # one call per model, its six groups together
    assert page.count("<h3>") == 6 and all(f"q {r[:-1]} {r[-1]} (answer 7)" in page for r in picked)
    assert page.count("<td><b>cold start</b> (tau = 0.500)") == page.count("<td><b>ARES</b> (tau = 1.000)") == 6
    first, branched = '<div class="l">#0: <span class="ok">right</span>, 2 tokens, N_HE = 1</div>', \
        '<div class="l">#1 branched from #0 at token 1: <span class="no">wrong</span>, 2 tokens, N_HE = 0</div>'
    assert page.count(first) == page.count(branched) == 12
    # shading: window entropy / (2 tau), capped at 1; the HWE token outlined (class h); the branch's inherited "So"
    # faded (class p), then the blue bar where it starts sampling (class b); the token text escaped
    assert ('<span class="t" style="background:rgba(255,120,0,0.50)" title="window entropy 0.500">So</span>'
            '<span class="t h" style="background:rgba(255,120,0,1.00)" title="window entropy 2.000">&lt;b&gt;</span>'
            ) in page
    assert ('<span class="t p" style="background:rgba(255,120,0,0.50)" title="window entropy 0.500">So</span>'
            '<span class="b">|</span><span class="t" style="background:rgba(255,120,0,0.10)" title="window entropy '
            '0.100">x</span>') in page
    assert ".h{outline:" in page and ".p{opacity:" in page and ".b{color:" in page
    assert not any(word in page.lower() for word in ("<script", " src=", "href=", "@import", "url("))
