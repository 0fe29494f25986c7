"""Issue 2, the foundation: the tiny model, data validation, the cold-start (AdaCS) loss and its global token-mean
under micro-batching, accumulation and torchrun, checkpoints (from_pretrained, kill-and-resume), --compile, --help.

Every check compares the trainer with an independent reference: a plain `model(...)` forward and a hand-written
cross-entropy, gradients from AdamW's first moment, parameters of an uninterrupted run.
"""
import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, LayerRecomputes, run_script, run_until_first_step_save
from PIL import Image
from safetensors.torch import load_file, save_file

import ares
import data_prep

BETA1 = 0.9  # AdamW's default first-moment decay: after one step exp_avg = (1 - beta1) * grad


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def subset(demo_file: Path, out: Path, ids: list[int]) -> Path:
    """A copy of some records of a demo split, images given as absolute paths so the file can live anywhere."""
    rows = read_jsonl(demo_file)
    picked = [dict(rows[i], images=[str(demo_file.parent / im) for im in rows[i]["images"]]) for i in ids]
    return write_jsonl(out, picked)


def coldstart(data: Path, out: Path, model, *extra) -> list[str]:
    return ["--stage", "coldstart", "--model", str(model), "--data", str(data), "--out", str(out), *map(str, extra)]


def reference_sft_loss(model, processor, data: Path):
    """Sum over records of -log p(response token | prompt, earlier response tokens) and the number of those tokens,
    from one plain model(...) call per record (no padding, the model derives its own 3-D positions) and a manual
    log_softmax + gather over the response positions only. The response is the trace followed by <|im_end|>.
    The policy's vocabulary excludes the image/video placeholders (a response never contains one), so they are
    left out of the softmax here as well."""
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    total, count = 0.0, 0
    for row in read_jsonl(data):
        images = [Image.open(p).convert("RGB") for p in row["images"]]
        record = dict(question=row["question"], images=images, id=row["id"])
        enc = processor(text=[data_prep.prompt_text(processor, record)], images=images or None, return_tensors="pt")
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [eot]
        P, n = enc["input_ids"].shape[1], len(response)
        ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)  # (1, P + n)
        mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, n, dtype=enc["mm_token_type_ids"].dtype)], 1)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                       image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm).logits[0]  # (P + n, V)
        logits = logits.float().index_fill(-1, torch.tensor(placeholder_ids(model)), float("-inf"))
        logp = torch.log_softmax(logits, -1)
        positions = torch.arange(P - 1, P + n - 1)  # position P + k - 1 predicts response token k
        total = total - logp[positions, torch.tensor(response)].sum()
        count += n
    return total, count


def placeholder_ids(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def adam_first_step_grads(ckpt: Path) -> dict[str, torch.Tensor]:
    """The gradient of the (single) optimizer step of a run, read back from AdamW's first moment (the checkpoint's
    sharded state/ folder, merged into one file by torch's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "state", ckpt.parent / "state.pt")
    state = torch.load(ckpt.parent / "state.pt", map_location="cpu", weights_only=False)["optim"]["state"]
    return {name.removeprefix("hf."): s["exp_avg"] / (1 - BETA1) for name, s in state.items()}


def checkpoint_params(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------


def test_tiny_model_tokenizer_and_processor_build_offline_and_forward_with_images(tiny, demo_data):
    model, processor = tiny
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert 1e5 < n < 1e6, n  # "a few hundred thousand parameters"
    tok = processor.tokenizer
    text = "Count the red squares: 3. The answer is \\boxed{3}."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    row = read_jsonl(demo_data["sft"])[0]
    image = Image.open(Path(demo_data["sft"]).parent / row["images"][0]).convert("RGB")
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n"
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_image == int(enc["image_grid_thw"].prod()) // 4 > 0  # 14-px patches, 2 x 2 merge
    is_image = (enc["input_ids"] == model.config.image_token_id).to(enc["mm_token_type_ids"].dtype)
    assert torch.equal(enc["mm_token_type_ids"], is_image)
    with torch.no_grad():
        logits = model(**enc).logits
        other = model(**dict(enc, pixel_values=enc["pixel_values"].flip(0))).logits  # a different image
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    assert (logits[0, -1] - other[0, -1]).abs().max() > 1e-4  # the image reaches the text positions


def test_sft_loss_is_cross_entropy_over_exactly_the_response_tokens(tiny, tiny_ckpt, demo_data, tmp_path):
    model, processor = tiny
    data = subset(Path(demo_data["sft"]), tmp_path / "two.jsonl", [0, 2])  # an easy and a hard record: ragged lengths
    with torch.no_grad():
        ref_sum, ref_count = reference_sft_loss(model, processor, data)
    ref = (ref_sum / ref_count).item()
    # the trainer's batch and forward (right padding, resp_mask) ...
    records = data_prep.load_records(str(data), need_response=True)
    ids = ares.special_ids(model, processor)
    responses = [torch.tensor(processor.tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [ids["eot"]])
                 for r in records]
    batch = ares.make_batch(model, [data_prep.encode_prompt(processor, r) for r in records], responses, ids["pad"], "cpu")
    with torch.no_grad():
        logp, _ = ares.Policy(model)(batch)
    assert int(batch["resp_mask"].sum()) == ref_count
    assert -(logp * batch["resp_mask"]).sum().item() / ref_count == pytest.approx(ref, rel=1e-5)
    # ... and the loss the cold-start loop logs for its first step (before the update)
    ares.main(coldstart(data, tmp_path / "run", tiny_ckpt, "--steps", 1, "--batch-size", 2, "--micro-batch-size", 2))
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert logged[0]["loss"] == pytest.approx(ref, rel=1e-5)


def test_gradient_is_the_global_token_mean_for_any_micro_batch_accumulation_and_ranks(tiny, tiny_ckpt, demo_data,
                                                                                       tmp_path):
    """(micro 4 x 1), (micro 2 x accumulate 2) and torchrun 2 ranks x (micro 1 x accumulate 2) on the same 4 records
    must all take the gradient of ONE token-mean over the 4 records (not a mean of per-micro-batch means)."""
    model, processor = tiny
    data = subset(Path(demo_data["sft"]), tmp_path / "four.jsonl", [0, 1, 2, 4])  # lengths differ a lot
    ref_model = copy.deepcopy(model).train()
    total, count = reference_sft_loss(ref_model, processor, data)
    (total / count).backward()
    reference = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None and ".visual." not in f".{n}"}
    common = ["--steps", 1, "--batch-size", 4, "--grad-clip", 1e9, "--save-every", 100]
    runs = {}
    for micro in (4, 2):
        ares.main(coldstart(data, tmp_path / f"micro{micro}", tiny_ckpt, *common, "--micro-batch-size", micro))
        runs[f"micro {micro}"] = tmp_path / f"micro{micro}"
    run_script(["ares.py", *coldstart(data, tmp_path / "ddp", tiny_ckpt, *common, "--micro-batch-size", 1)], nproc=2)
    runs["torchrun 2 x micro 1"] = tmp_path / "ddp"
    for name, out in runs.items():
        grads = adam_first_step_grads(out / "final")
        assert set(grads) == set(reference), f"{name}: trained parameters differ (vision tower must be frozen)"
        for n, g in reference.items():
            err = (grads[n] - g).abs().max().item()
            assert err <= 1e-4 * g.abs().max().item() + 1e-8, f"{name}: {n} off by {err}"
        assert read_jsonl(out / "metrics.jsonl")[0]["loss"] == pytest.approx((total / count).item(), rel=1e-5), name


def test_a_few_dozen_steps_lower_the_loss_and_the_checkpoint_loads_with_from_pretrained(tiny, tiny_ckpt, demo_data,
                                                                                        tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    trained = {}
    save = ares.save_checkpoint

    def keep_model(out, name, policy, *args, **kw):  # the in-memory model the checkpoint is written from
        trained[name] = policy.hf
        return save(out, name, policy, *args, **kw)

    monkeypatch.setattr(ares, "save_checkpoint", keep_model)
    out = tmp_path / "run"
    ares.main(coldstart(demo_data["sft"], out, tiny_ckpt, "--steps", 30, "--batch-size", 8, "--micro-batch-size", 8,
                        "--lr", 3e-3, "--warmup-steps", 3))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses

    loaded, info = AutoModelForImageTextToText.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model, processor = tiny
    tok = AutoTokenizer.from_pretrained(out / "final")
    sample = "<|im_start|>assistant\n<think>Count the red squares: 3.</think><|im_end|>"
    assert tok(sample)["input_ids"] == processor.tokenizer(sample)["input_ids"]
    record = data_prep.load_records(str(demo_data["sft"]), need_response=True)[0]
    enc = processor(text=[data_prep.prompt_text(processor, record)], images=record["images"], return_tensors="pt")
    with torch.no_grad():
        got = loaded.eval()(**enc).logits
        want = trained["final"].eval()(**enc).logits
        before = model(**enc).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - before).abs().max() > 1e-2  # it is the trained model, not the starting one


def test_kill_and_resume_gives_the_parameters_of_an_uninterrupted_run(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    data = subset(Path(demo_data["sft"]), tmp_path / "data.jsonl", list(range(12)))
    common = ["--steps", 4, "--batch-size", 4, "--micro-batch-size", 2, "--warmup-steps", 1, "--lr", 3e-3]
    ares.main(coldstart(data, tmp_path / "straight", tiny_ckpt, *common, "--save-every", 100))

    out = tmp_path / "interrupted"
    run_until_first_step_save(monkeypatch, lambda: ares.main(coldstart(data, out, tiny_ckpt, *common, "--save-every", 2)))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "step_000002"]  # + the run record
    # a kill during later saves: a renamed-too-early folder without COMPLETE and a leftover .tmp that claims step 3;
    # both hold different weights, so resuming from either would change the result
    for bad in ("step_000004", "step_000003.tmp"):
        shutil.copytree(out / "step_000002", out / bad)
        sd = checkpoint_params(out / bad)
        save_file({k: v + 1.0 for k, v in sd.items()}, str(out / bad / "model.safetensors"), metadata={"format": "pt"})
    (out / "step_000004" / "COMPLETE").unlink()
    (out / "step_000003.tmp" / "COMPLETE").write_text(json.dumps({"step": 3, "time": 0}))
    ares.main(coldstart(data, out, tiny_ckpt, *common, "--save-every", 2, "--resume"))

    straight, resumed = checkpoint_params(tmp_path / "straight" / "final"), checkpoint_params(out / "final")
    assert set(straight) == set(resumed)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    losses = [[r["loss"] for r in read_jsonl(run / "metrics.jsonl")] for run in (out, tmp_path / "straight")]
    assert losses[0] == losses[1]
    state = torch.load(out / "final" / "trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 4 and state["scheduler"]["last_epoch"] == 4


def _bad_data(kind: str, demo_file: Path, tmp_path: Path) -> tuple[Path, str, list[str]]:
    """A file whose LAST record is broken (so validation must read every record up front): (path, record, words)."""
    rows = [dict(r, images=[str(demo_file.parent / im) for im in r["images"]]) for r in read_jsonl(demo_file)[:4]]
    bad = dict(rows[-1], id="broken-7")
    path = tmp_path / f"{kind}.jsonl"
    if kind == "missing answer":
        del bad["answer"]
        words = ["answer"]
    elif kind == "empty question":
        bad["question"] = "   "
        words = ["question"]
    elif kind == "unreadable image":
        (tmp_path / "garbage.png").write_bytes(b"this is not a png")
        bad["images"] = [str(tmp_path / "garbage.png")]
        words = ["image"]
    else:  # bad JSON line
        write_jsonl(path, rows)
        with open(path, "a") as fh:
            fh.write('{"id": "broken-7", "question": "oops"\n')
        return path, "line 5", ["JSON"]
    return write_jsonl(path, rows + [bad]), "broken-7", words


@pytest.mark.parametrize("kind, stage", [("missing answer", "coldstart"), ("empty question", "coldstart"),
                                         ("unreadable image", "coldstart"), ("bad JSON line", "coldstart"),
                                         ("missing answer", "aepo")])  # the AEPO stage runs the same validation
def test_malformed_record_stops_before_training_with_an_error_naming_file_and_record(kind, stage, tiny_ckpt, demo_data,
                                                                                     tmp_path):
    path, record, words = _bad_data(kind, Path(demo_data["sft"]), tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        ares.main(["--stage", stage, "--model", str(tiny_ckpt), "--data", str(path), "--out", str(out), "--steps", "1",
                   "--batch-size", "2"])
    msg = str(err.value.code)
    assert msg.startswith("data error: ") and str(path) in msg and record in msg, msg
    assert all(w.lower() in msg.lower() for w in words), msg
    assert not out.exists()  # nothing was trained, loaded or written


def test_cli_exits_nonzero_with_data_error(tiny_ckpt, demo_data, tmp_path):
    path, record, _ = _bad_data("unreadable image", Path(demo_data["sft"]), tmp_path)
    res = subprocess.run([sys.executable, "ares.py", *coldstart(path, tmp_path / "out", tiny_ckpt, "--steps", 1)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "data error: " in res.stderr and record in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_compile_smoke(tiny, tiny_ckpt, demo_data, tmp_path):
    """--compile in the cold start: the decoder layers run compiled (step 1's loss is the eager reference's on its
    record) and compile once for any length (README: compile): three records of three lengths, one a step, and only
    the first step compiles (without dynamic shapes, the second length compiles again)."""
    model, processor = tiny
    references = []
    for k in (0, 2, 4):  # an easy, a hard and a medium record: three trace lengths
        one = subset(Path(demo_data["sft"]), tmp_path / f"r{k}.jsonl", [k])
        with torch.no_grad():
            total, count = reference_sft_loss(model, processor, one)
        references.append((total / count).item())
    data = subset(Path(demo_data["sft"]), tmp_path / "three.jsonl", [0, 2, 4])
    lengths = {data_prep.prompt_length(processor, r) + len(processor.tokenizer(r["response"]).input_ids)
               for r in data_prep.load_records(str(data))}
    assert len(lengths) == 3, lengths  # three sequence lengths
    run_script(["ares.py", *coldstart(data, tmp_path / "run", tiny_ckpt, "--compile", "--steps", 3, "--batch-size", 1,
                                      "--micro-batch-size", 1)])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and min(abs(rows[0]["loss"] - ref) / ref for ref in references) < 1e-4, (rows, references)
    # one graph for the tiny model's 3 decoder layers (README: one set of graphs for all layers, any batch and length)
    assert rows[0]["graphs_compiled"] == 1 and [r["graphs_compiled"] for r in rows[1:]] == [0, 0], rows
    start, end = checkpoint_params(tiny_ckpt), checkpoint_params(tmp_path / "run" / "final")
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the compiled step did update the model
    assert (tmp_path / "run" / "final" / "COMPLETE").exists()


def test_compile_under_fsdp_compiles_the_cold_starts_layers_and_trains_as_eager(tiny_ckpt, demo_data, tmp_path):
    """--compile --fsdp in the cold start (torchrun, 2 ranks): the decoder layers run compiled, with FSDP's gathers in
    each layer's hooks outside the compiled forward (before, wrap_policy returned for FSDP before it compiled, and
    --compile did nothing: 0 graphs). Each step's loss is the uncompiled --fsdp run's; only the first step compiles."""
    data = subset(Path(demo_data["sft"]), tmp_path / "four.jsonl", [0, 1, 2, 3])
    rows = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", "eager"])):
        run_script(["ares.py", *coldstart(data, tmp_path / name, tiny_ckpt, "--fsdp", "--steps", 2, "--batch-size", 2,
                                          "--micro-batch-size", 1, *extra)], nproc=2)
        rows[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    # one graph shared by the 3 layers, FSDP's hooks outside it (a graph per layer would be 3)
    assert [r["graphs_compiled"] for r in rows["compiled"]] == [1, 0], rows["compiled"]
    for got, want in zip(rows["compiled"], rows["eager"], strict=True):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got, want)


def test_help_lists_every_config_field_with_its_default():
    res = run_script(["ares.py", "--help"])
    entries, current = {}, None
    for line in res.stdout.splitlines():  # "  --flag METAVAR  help..." then indented continuation lines
        m = re.match(r"^  (--[a-z-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    for f in dataclasses.fields(ares.Config):
        if "help" not in f.metadata:  # not a flag (Config.given records which flags were given)
            continue
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in entries, f"{flag} missing from --help"
        entry = " ".join(entries[flag].split())
        assert "default" in entry.lower() or (f.default == "" and "required" in entry), f"{flag}: no default: {entry!r}"
        if f.default not in (None, ""):  # an empty default is described in words ("default: the starting --model")
            assert re.search(rf"default: {re.escape(str(f.default))}[);]", entry), f"{flag}: default {f.default!r} missing: {entry!r}"
        for stage, layer in ares.STAGE_DEFAULTS.items():
            if f.default is None and f.name in layer:
                assert f"{stage} {layer[f.name]}" in entry, f"{flag}: {stage} default missing: {entry!r}"
    # README "Flags": every flag its table names is one --help lists, with the choices the table gives it
    table = (ROOT / "README.md").read_text().split("\n## Flags\n")[1].split("\n### LoRA\n")[0]
    named = re.findall(r"`(--[a-z][a-z0-9-]*)( [a-z-]+(?:\\\|[a-z-]+)+)?", table)
    assert len(named) > 60
    for flag, choices in named:
        if flag not in ("--help", "--demo"):  # ares.py's own --help; eval.py's --demo
            assert flag in entries, f"the README's {flag} is not an ares.py flag"
        if choices:  # `--flag a\|b`: exactly the flag's choices
            field = next(f for f in dataclasses.fields(ares.Config) if f.name == flag[2:].replace("-", "_"))
            assert set(choices.strip().split("\\|")) == set(field.metadata["choices"]), flag


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt", "state/__0_0.distcp", "COMPLETE"])
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(damaged, tiny_ckpt, demo_data, tmp_path, capsys):
    data = subset(Path(demo_data["sft"]), tmp_path / "data.jsonl", list(range(4)))
    common = ["--batch-size", 2, "--micro-batch-size", 2, "--save-every", 1, "--keep-last", 3]
    out = tmp_path / "run"
    ares.main(coldstart(data, out, tiny_ckpt, "--steps", 2, *common))
    assert (out / "step_000001" / "COMPLETE").exists() and (out / "final" / "COMPLETE").exists()
    victim = out / "final" / damaged  # a disk that filled up, a copy cut short
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()
    ares.main(coldstart(data, out, tiny_ckpt, "--steps", 3, *common, "--resume"))
    printed = capsys.readouterr().out
    why = "its COMPLETE file is unreadable" if damaged == "COMPLETE" else f"{damaged} is missing or truncated"
    assert printed.count(f"checkpoint {out / 'final'} is damaged ({why})") == 1, printed  # a cut COMPLETE was a
    # JSONDecodeError; the warning was printed once by the folder's checks and again by the resume
    assert f"resumed from {out / 'step_000001'} at step 1" in printed, printed
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_on_an_empty_out_says_it_starts_fresh(tiny_ckpt, demo_data, tmp_path, capsys):
    data = subset(Path(demo_data["sft"]), tmp_path / "data.jsonl", list(range(2)))
    ares.main(coldstart(data, tmp_path / "run", tiny_ckpt, "--steps", 1, "--batch-size", 2, "--resume"))
    assert f"--resume: no complete checkpoint in {tmp_path / 'run'}: starting fresh" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_every_checkpoint_file_reaches_the_disk_before_the_rename(tiny_ckpt, demo_data, tmp_path, monkeypatch):
    """fsync of every file (and of the folder after the rename): a power cut must not leave a COMPLETE checkpoint
    whose data never reached the disk."""
    import os

    synced, renames = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        files = {p for p in Path(src).rglob("*") if p.is_file()}
        renames.append((Path(src), files, set(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    data = subset(Path(demo_data["sft"]), tmp_path / "data.jsonl", list(range(2)))
    out = tmp_path / "run"
    ares.main(coldstart(data, out, tiny_ckpt, "--steps", 1, "--batch-size", 2))
    (src, files, before), = [r for r in renames if r[0].name == "final.tmp"]
    assert {"COMPLETE", "model.safetensors", "trainer_state.pt", "rng_0.pt"} <= {f.name for f in files}
    assert any(f.suffix == ".distcp" for f in files)
    assert files <= before, sorted(str(f) for f in files - before)
    assert out in synced[len(before):]  # the folder entry of the rename


@pytest.mark.parametrize("path", ["one process", "ddp", "fsdp", "resume", "aepo"])
@pytest.mark.parametrize("flag", [True, False])
def test_grad_checkpointing_recomputes_every_layer_of_a_saved_model_through_the_trainer(path, flag, tiny_ckpt, demo_data,
                                                                                        tmp_path, monkeypatch):
    """A saved model (--model <folder>) comes back from from_pretrained in eval mode, and Hugging Face checkpoints a
    layer only in training mode: the trainer must train in training mode. Through ares.main (DDP and --fsdp under
    torchrun's environment at world size 1; --resume from a saved run; an AEPO step, whose update runs the
    shared-prompt forward), counted by hooks (LayerRecomputes) on the model the trainer trains: with
    --grad-checkpointing every decoder-layer call of a gradient forward is recomputed in backward, without it none."""
    import socket

    counts = []
    prepare = ares.prepare_training

    def counted(cfg, run, device, total):
        run = prepare(cfg, run, device, total)
        counts.append(LayerRecomputes(run.hf))
        return run

    monkeypatch.setattr(ares, "prepare_training", counted)
    data = subset(Path(demo_data["sft"]), tmp_path / "two.jsonl", [0, 3])
    flags = ["--grad-checkpointing"] if flag else []
    args = coldstart(data, tmp_path / "run", tiny_ckpt, "--steps", 1, "--batch-size", 2, "--micro-batch-size", 1, *flags)
    if path in ("ddp", "fsdp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            monkeypatch.setenv(k, v)
        args += ["--fsdp"] if path == "fsdp" else []
    if path == "resume":  # a run saved at step 1, resumed to step 2: the model comes from its checkpoint
        ares.main(args)
        args[args.index("--steps") + 1] = "2"
        args += ["--resume"]
    if path == "aepo":
        args = ["--stage", "aepo", "--model", str(tiny_ckpt), "--data", str(demo_data["rl"]), "--out", str(tmp_path / "run"),
                "--steps", "1", "--batch-size", "2", "--group-size", "4", "--max-response-len", "8",
                "--keep-uniform-groups", "--micro-batch-size", "4", "--log-samples-every", "0", *flags]
    ares.main(args)
    assert (tmp_path / "run" / "final" / "COMPLETE").exists()
    grad_layer_calls, recomputed = counts[-1].layer, counts[-1].recomputed
    assert grad_layer_calls > 0
    assert recomputed == (grad_layer_calls if flag else 0), (grad_layer_calls, recomputed)


@pytest.mark.parametrize("train_vision", [False, True])
def test_a_frozen_vision_tower_runs_once_without_gradients_in_the_update(train_vision, tiny, demo_data):
    """Paper: the vision tower is frozen. The update (the trainer's make_trainable, --grad-checkpointing, the
    shared-prompt batch) then runs it once without gradients: nothing of it is recorded, recomputed or differentiated
    in backward. With --train-vision it runs with gradients and its weights get them."""
    model = ares.make_trainable(copy.deepcopy(tiny[0]), ares.Config(grad_checkpointing=True, train_vision=train_vision))
    block = model.model.visual.blocks[0]
    calls = []  # grad mode of each call of the first vision block's MLP (a recompute calls it again)
    block.mlp.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    processor = tiny[1]
    prompts = [data_prep.encode_prompt(processor, r) for r in data_prep.load_records(str(demo_data["rl"]))[:2]]
    responses = [torch.randint(100, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 6, 5)]
    batch = ares.shared_prompt_batch(model, [prompts[0], prompts[0], prompts[1]], responses,
                                     ares.special_ids(model, processor), "cpu")
    logp, _ = ares.Policy(model)(batch)
    (logp * batch["resp_mask"]).sum().backward()
    assert calls == ([True, True] if train_vision else [False]), calls  # trained: its forward, then its recompute
    vision = [p for n, p in model.named_parameters() if "visual" in n]
    assert all((p.grad is not None) == train_vision for p in vision)
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0  # the language model learns either way


def test_cold_start_mfu_counts_every_token_the_language_model_reads_against_the_cards_own_peak(monkeypatch):
    # (4 N + 2 N_trained) FLOPs per token, by hand: full fine-tuning is 6 N, LoRA about 4 N; the PCIe H100's peak is
    # 756 TFLOP/s, the SXM one's 989; on a CPU there is no MFU
    class Cuda:
        type = "cuda"

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names.pop(0))
    names = ["NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "Some Future GPU"]
    assert ares.mfu(1e4, 3e9, 3e9, Cuda()) == pytest.approx(6 * 3e9 * 1e4 / 756e12)
    assert ares.mfu(1e4, 3e9, 3e9, Cuda()) == pytest.approx(6 * 3e9 * 1e4 / 989e12)
    assert ares.mfu(1e4, 3e9, 1e7, Cuda()) == pytest.approx((12e9 + 2e7) * 1e4 / 989e12)  # LoRA: 1e7 adapter weights
    assert ares.mfu(1e4, 3e9, 3e9, Cuda()) is None  # an unknown card: no peak to compare with
    assert ares.mfu(1e4, 3e9, 3e9, torch.device("cpu")) is None
