"""Evaluate checkpoints side by side: accuracy AND response length, per benchmark and difficulty (paper §4).

ARES claims two things at once: higher accuracy, and fewer tokens on easy problems but more on hard ones. This
script measures both, for one or several checkpoints in one run, so you see what AEPO did to your model:

    python eval.py --model runs/ares/coldstart/final --model runs/ares/aepo/final \\
        --name "cold start" --name "after AEPO" --data runs/ares/data/test.jsonl --out runs/eval
    torchrun --nproc_per_node=8 eval.py --model A --model B --data mathvista-testmini --data math500 --out runs/eval
    python eval.py --model A --data some/hub-dataset --split test --question-col problem --answer-col answer
    python eval.py --model A --data aime25.jsonl --temperature 0.6 --top-p 0.95 --samples 16   # mean@16 and its SE
    python eval.py --help                                          # every knob; presets: python data_prep.py convert --help
    torchrun --nproc_per_node=8 eval.py passrate --data pool.jsonl --model M --k 8 --out rates.jsonl  # AdaCS step 1
    python eval.py curves runs/aepo/metrics.jsonl                  # runs/aepo/curves.png: an AEPO run's curves
    python eval.py demo-report runs/ares                           # the report of a `python ares.py` run
    python eval.py --demo runs/seed0 --demo runs/seed1             # mean +- sd table over demo runs

It sits at the top of the import graph (data_prep.py <- ares.py <- eval.py): it imports both, and samples with
ares.py's sampler, so it also computes pass rates (AdaCS step 1, paper §3.1) and draws an AEPO run's curves.

What it does, in order:
  1. Read each benchmark. Local files in our record format (README: data format) go through data_prep's reader; named presets
     (data_prep.PRESETS) and Hugging Face datasets through data_prep.load_source (its column mapping). Every
     record is checked on its own: one that cannot be used (missing field, unreadable image, prompt longer than
     --max-prompt-len, an error while generating) is listed in the report and counted as WRONG: never silently
     dropped, never the end of the run. A benchmark with no usable record at all stops the run, before any model loads.
  2. Generate with ares.sample, the trainer's own sampler: greedy by default, or sampled (--temperature,
     --top-p) with --samples N responses per prompt. The usable records are cut, in benchmark order, into
     fixed chunks of --batch-size prompts; a chunk is one sampler call whose generator is seeded from --seed and
     the chunk's record ids (ares.sample draws one noise vector per step for its whole batch, so a seed is per
     call). Ranks take chunks round-robin and rank 0 gathers them after every round, so the numbers do not
     depend on the number of processes (they do depend on --batch-size when sampling).
  3. Grade with data_prep's grader, the one AEPO rewards with: the last \\boxed{} against the answer (extract_boxed,
     is_correct), and the <think>...</think> + \\boxed{} format (format_ok).
  4. Metrics per model and benchmark, overall and per difficulty bucket (`summarize`, `metric_row`).
  5. Write <out>/responses.jsonl (every response with its verdict), <out>/results.json (every number, the
     config) and print the table; --plot draws accuracy against mean response tokens.

responses.jsonl is also the cache: re-running with the same --out reuses every response whose key is already there,
and generates only the rest. The key (`response_key`) covers everything a response and its verdict depend on: the
model (its folder and the weights in it), the benchmark, the record id and sample index, the decoding and loading
settings, and the record's own content (its prompt text, answer and image bytes): a record edited in place, or a
run with another --dtype or --max-pixels, is generated again.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import ares
import data_prep
from ares import arg, gather
from data_prep import bucket_field, bucket_of, bucket_order, check_prompts, metric_row, response_lines, summarize  # noqa: F401



# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a --flag with its help string (list fields repeat: --model A --model B).


@dataclass
class EvalConfig(ares.ModelConfig):  # dtype, attn, min_pixels, max_pixels: as ares.py's
    model: list = field(default_factory=list, metadata={"help": "checkpoint folder or hub name; repeat to compare "
                                                                 "(the first is the baseline of the differences)"})
    name: list = field(default_factory=list, metadata={"help": "display name of each --model, in order (default: "
                                                                "from the path)"})
    data: list = field(default_factory=list, metadata={"help": "benchmark: local JSONL/Parquet/saved dataset in our "
                                                                "record format, a data_prep.PRESETS name, or a hub "
                                                                "dataset; repeat for several"})
    out: str = arg("runs/eval", "output folder: responses.jsonl (also the cache), results.json")
    # benchmarks read through data_prep.load_source
    preset: str = arg("", "data_prep preset (columns, split) to apply to every non-local --data")
    split: str = arg("", "dataset split (default: a benchmark preset's own, 'test' for a training preset such as "
                         "geometry3k and for a local saved dataset)")
    config: str = arg("", "hub dataset configuration (subset) name")
    question_col: str = arg("", "column holding the question (hub datasets)")
    answer_col: str = arg("", "column holding the final answer (hub datasets)")
    image_col: str = arg("", "column holding the image(s) (hub datasets)")
    id_col: str = arg("", "column holding a unique record id (hub datasets)")
    choices_col: str = arg("", "column of multiple-choice options, rendered into the question (hub datasets)")
    limit: int = arg(0, "evaluate only the first N records of each benchmark (0 = all)", allowed=ares.AT_LEAST_0)
    # decoding
    max_new_tokens: int = arg(8192, "response token limit; a response that reaches it counts as truncated",
                              allowed=ares.AT_LEAST_1)
    temperature: float = arg(0.0, "0 = greedy; >= 0.01 samples", allowed=ares.GREEDY_OR_SAMPLED_T)
    top_p: float = arg(1.0, "nucleus mass when sampling", allowed=ares.IN_0_1)
    samples: int = arg(1, "responses per prompt: accuracy is mean@N (needs --temperature > 0 when N > 1)",
                       allowed=ares.AT_LEAST_1)
    batch_size: int = arg(64, "prompts per sampler call (each with --samples responses)", allowed=ares.AT_LEAST_1)
    max_prompt_len: int = arg(4096, "a prompt longer than this many tokens (images included) is a failed record",
                              allowed=ares.AT_LEAST_1)
    seed: int = arg(0, "seed of the sampled decoding", allowed=ares.SEED)
    # report
    bucket_by: str = arg("auto", "difficulty buckets from: auto (difficulty, else level, else pass_rate), "
                                 "difficulty, level, pass_rate, or none", ("auto", "difficulty", "level", "pass_rate", "none"))
    plot: str = arg("", "PNG file: accuracy against mean response tokens per benchmark and model (needs matplotlib)")
    demo: list = field(default_factory=list, metadata={"help": "--out folder of a `python ares.py` run; repeat for "
                                                               "several seeds: prints their mean +- sd table"})
    # not a flag: the flags given on the command line (a tiny checkpoint takes --min-pixels / --max-pixels only then)
    given: tuple = field(default=(), repr=False)


SUBCOMMANDS = """subcommands (each with its own --help):
  eval.py passrate --data D --model M --out rates.jsonl   K samples per problem, graded: pass_rate (AdaCS step 1)
  eval.py curves runs/ares/aepo/metrics.jsonl             an AEPO run's curves into curves.png beside it
  eval.py demo-report runs/ares                           the report of a `python ares.py` run"""


def parse_config(argv=None) -> EvalConfig:
    parser = ares.dataclass_parser(EvalConfig, __doc__.split("\n")[0])
    parser.epilog = SUBCOMMANDS
    args = vars(parser.parse_args(argv))
    data_prep.expand_home(args, ("out", "plot", "model", "data"))  # --out=~/x, --model=~/m
    given = vars(ares.dataclass_parser(EvalConfig, "", given_only=True).parse_args(argv))  # only what the user typed
    cfg = EvalConfig(**args, given=tuple(sorted(given)))
    if not cfg.demo and (not cfg.model or not cfg.data):
        parser.error("give at least one --model and one --data (or --demo runs)")
    if cfg.demo and (cfg.model or cfg.data):  # else the evaluation asked for is silently not run
        parser.error("--demo prints the summary of demo runs and evaluates nothing: give it without --model and --data")
    if cfg.name and len(cfg.name) != len(cfg.model):
        parser.error(f"{len(cfg.name)} --name for {len(cfg.model)} --model")
    if twice := next((n for n in cfg.name if cfg.name.count(n) > 1), None):  # results are filed by name
        parser.error(f"--name {twice} given twice: the second model's numbers would replace the first's in the table "
                     "and results.json; give each --model its own name")
    ares.check_numbers(cfg, hints={})
    data_prep.check_split_flags(cfg.data, split=cfg.split, config=cfg.config)
    if cfg.samples > 1 and cfg.temperature <= 0:
        parser.error("--samples > 1 needs --temperature > 0 (greedy responses would all be the same)")
    check_paths(cfg.model, cfg.out)
    check_pixel_flags(cfg)
    ares.check_attn(cfg.attn)
    if cfg.plot and Path(cfg.plot).is_dir():  # checked now: it is written only after the whole evaluation
        raise SystemExit(f"--plot {cfg.plot}: a folder; give the PNG file to write")
    if cfg.plot:
        ares.check_clear_of_run("--plot", cfg.plot, folder=False)
        data_prep.check_writable("--plot", cfg.plot, folder=False)
        check_plot_format(cfg.plot)
    return cfg


def check_plot_format(png: str):
    """--plot's suffix a format matplotlib writes (none: PNG), checked now: the figure is drawn after the whole
    evaluation. Without matplotlib there is nothing to check: the plot is skipped, with a message."""
    fmt = Path(png).suffix.lstrip(".").lower() or "png"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise SystemExit(f"--plot {png}: matplotlib cannot write a .{fmt} file; give a .png file")


def check_paths(models: list[str], out: str):
    """Before anything loads: each --model a model (one line naming a run folder or a LoRA adapter otherwise), and
    --out not a file."""
    for m in models:
        ares.check_model_path("--model", m)
    if Path(out).exists() and not Path(out).is_dir():
        raise SystemExit(f"--out {out}: a file, not a folder")
    ares.check_clear_of_run("--out", out)
    check_eval_folder(out)
    data_prep.check_writable("--out", out)


def check_pixel_flags(cfg: EvalConfig):
    """--min-pixels / --max-pixels where no --model takes images: the flags would do nothing (ares.py and passrate
    stop on the same, training_processor). One vision-language model among them is enough: the flags are its."""
    flags = [f for f in ("min_pixels", "max_pixels") if f in cfg.given]
    if flags and cfg.model and not any(m == "tiny" or ares.model_config(m)[1] for m in cfg.model):
        which = f"--model {cfg.model[0]} is a text-only model" if len(cfg.model) == 1 else \
            f"every --model ({', '.join(cfg.model)}) is a text-only model"
        raise ares.vision_flag_unused(flags[0], which)


def check_eval_folder(out: str):
    """--out's responses.jsonl and results.json, where there, eval.py's own: the cache is appended to and results.json
    replaced, so a file of another tool under either name (a user's records saved as responses.jsonl) would be mixed
    with responses or lost. One line naming the file otherwise, before anything loads."""
    cache, results = Path(out) / "responses.jsonl", Path(out) / "results.json"
    if cache.is_file() and not response_cache(cache):
        raise SystemExit(f"--out {out}: {cache} is not eval.py's cache (its first line is not a response with a "
                         "\"key\"), and the responses would be appended to it: move it, or choose another --out")
    if results.exists():
        try:
            saved = json.loads(results.read_bytes())
        except (OSError, ValueError):  # unreadable, not JSON
            saved = None
        if not (isinstance(saved, dict) and {"config", "metrics", "table"} <= saved.keys()):
            raise SystemExit(f"--out {out}: {results} is not eval.py's results (no \"config\", \"metrics\" and "
                             "\"table\"), and the evaluation would replace it: move it, or choose another --out")


def response_cache(path: Path) -> bool:
    """Is `path` eval.py's responses.jsonl: empty, a first line a kill cut short, or a first whole JSON line that is a
    response line (read_cache's test)?"""
    lines = 0
    with open(path, "rb") as fh:
        for lines, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            return isinstance(row, dict) and isinstance(row.get("key"), str)
    return lines <= 1  # nothing whole: empty, or one line cut short


# ----------------------------------------------------------------------------------------------------------
# Benchmarks: records as data_prep.load_records makes them, but checked one by one, so that a bad record is
# reported instead of ending the run (training wants the opposite: fail before the first step).


def column_mapping(cfg: EvalConfig) -> dict:
    """{record field: dataset column} from the --*-col flags (only those given)."""
    cols = dict(question=cfg.question_col, answer=cfg.answer_col, images=cfg.image_col, id=cfg.id_col,
                choices=cfg.choices_col)
    return {k: v for k, v in cols.items() if v}


def load_benchmark(spec: str, cfg: EvalConfig) -> dict:
    """-> {name, key, records, failures}: the usable records and the rows that failed their check ({id, error}).
    `key` names the benchmark in the cache (an absolute path for local files)."""
    mapping = column_mapping(cfg)
    if Path(spec).exists() and not cfg.preset and not mapping:  # our own record format
        path = Path(spec).resolve()
        rows = data_prep.record_rows(str(path), cfg.split or "test")
        base, name, key = data_prep.data_folder(spec).resolve(), path.stem, str(path)  # images: as training finds them
    else:  # a preset or a hub dataset: data_prep owns the column mapping
        preset = cfg.preset or (spec if spec in data_prep.PRESETS else None)  # `--data mathvista-testmini` alone works
        split = cfg.split or (data_prep.held_out_split(preset) if preset else None)  # geometry3k's test, not its train
        rows = data_prep.load_source(spec, preset=preset, mapping=mapping or None, split=split,
                                     config=cfg.config or None, limit=cfg.limit or None)
        local = Path(spec).exists()
        base, name = Path.cwd(), Path(spec).stem if local else spec
        key = json.dumps(dict(source=str(Path(spec).resolve()) if local else spec, preset=preset, mapping=mapping,
                              split=split, config=cfg.config))
    failures = []  # each bad row is reported as {id, error, row} and the rest still evaluated
    records = data_prep.check_records(itertools.islice(rows, cfg.limit or None), name, base, name, errors=failures)
    if not records:  # bad records are counted as wrong, but with none usable there is nothing to load a model for
        raise data_prep.DataError(f"{spec}: " + (f"no usable record: all {len(failures)} failed their check, the first: "
                                                 f"record {failures[0]['id']}: {failures[0]['error']}" if failures
                                                 else "no records"))
    images = {r["id"]: [image_digest(im) for im in r["images"]] for r in records}  # once, for every model's cache key
    return dict(name=name, key=key, records=records, failures=failures, image_digests=images)



# ----------------------------------------------------------------------------------------------------------
# The table: models side by side, the difference to the first model beside them.


def render(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def delta_pct(a, b) -> str:
    """b - a in percentage points."""
    return "-" if a is None or b is None else f"{100 * (b - a):+.1f}"


def delta_num(a, b, relative: bool = False) -> str:
    """b - a, and with relative=True also (b - a) / a: the paper reports length changes in percent."""
    if a is None or b is None:
        return "-"
    return f"{b - a:+.1f}" + (f" ({(b - a) / a:+.0%})" if relative and a > 0 else "")


def bench_table(bench: str, per_model: dict[str, dict], names: list[str], decoding: str) -> str:
    """Per difficulty bucket and overall: accuracy and mean response tokens of each model, and the differences
    to the first model; then every overall metric."""
    first = per_model[names[0]]
    metric, deltas = first["overall"]["metric"], names[1:]
    dnames = ["Δ" if len(names) == 2 else f"Δ {n}" for n in deltas]
    lines = [f"== {bench}: {first['overall']['records']} records | {metric} | {decoding} =="]
    rows = [["", ""] + [f"{metric} (%)"] + [""] * (len(names) + len(deltas) - 1) + ["mean response tokens"]
            + [""] * (len(names) + len(deltas) - 1),
            [first["bucket_field"] or "", "n"] + names + dnames + names + dnames]
    for label in list(first["buckets"]) + ["overall"]:
        ms = [per_model[n]["overall"] if label == "overall" else per_model[n]["buckets"].get(label, {}) for n in names]
        a, t = [m.get("accuracy") for m in ms], [m.get("mean_tokens") for m in ms]
        rows.append([label, str(ms[0].get("records", "-"))] + [pct(x) for x in a] + [delta_pct(a[0], x) for x in a[1:]]
                    + [num(x) for x in t] + [delta_num(t[0], x, relative=True) for x in t[1:]])
    lines.append(render(rows))
    spread = [[first["bucket_field"] or ""] + names]  # how much the lengths vary: near 0, AEPO has none to choose from
    for label in list(first["buckets"]) + ["overall"]:
        ms = [per_model[n]["overall"] if label == "overall" else per_model[n]["buckets"].get(label, {}) for n in names]
        spread.append([label] + [f"{num(m.get('sd_tokens'))} / {num(m.get('iqr_tokens'))}" for m in ms])
    lines += ["", "response tokens, sd / IQR (near 0: one length everywhere, no length for AEPO to adapt)", render(spread)]
    ms = [per_model[n]["overall"] for n in names]
    detail = [["overall"] + names + dnames]
    acc_se = [pct(m["accuracy"]) + ("" if m["accuracy_se"] is None else f" ± {pct(m['accuracy_se'])}") for m in ms]
    detail.append([f"{metric} (%) ± SE"] + acc_se + [delta_pct(ms[0]["accuracy"], m["accuracy"]) for m in ms[1:]])
    for key, title, fmt, dfmt in (("mean_tokens", "mean tokens", num, delta_num),
                                  ("median_tokens", "median tokens", num, delta_num),
                                  ("truncated", "truncated (%)", pct, delta_pct),
                                  ("format_ok", "format ok (%)", pct, delta_pct)):
        detail.append([title] + [fmt(m[key]) for m in ms] + [dfmt(ms[0][key], m[key]) for m in ms[1:]])
    detail.append(["failed records"] + [str(m["failed"]) for m in ms] + [""] * len(deltas))
    lines += ["", render(detail)]
    return "\n".join(lines)


def pyplot(what: str):
    """matplotlib's pyplot on a file-only backend, or None (with a message saying what is skipped) without it:
    matplotlib is an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {what} (pip install matplotlib)", flush=True)
        return None
    return plt


def save_figure(plt, fig, png: Path) -> bool:
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)  # --plot may name a new folder, as --out may
    with data_prep.atomic_output(png) as tmp:
        fig.savefig(tmp, dpi=90, format=Path(png).suffix.lstrip(".") or "png")
    plt.close(fig)
    return True


def plot_results(results: dict, png: Path) -> bool:
    """Accuracy (%) against mean response tokens: one panel per benchmark, one colour per model; the large marker
    is the model's overall result, the small ones joined by a line are its difficulty buckets (needs matplotlib)."""
    plt = pyplot("--plot")
    if plt is None:
        return False
    benches = list(results["metrics"])
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for k, (name, m) in enumerate(results["metrics"][bench].items()):
            colour = f"C{k}"
            pts = [(b, v["mean_tokens"], v["accuracy"]) for b, v in m["buckets"].items() if v["mean_tokens"] is not None]
            if pts:
                ax.plot([p[1] for p in pts], [100 * p[2] for p in pts], "o-", color=colour, ms=4, lw=1, alpha=0.6)
                for b, x, y in pts:
                    ax.annotate(b, (x, 100 * y), fontsize=7, color=colour, xytext=(3, 3), textcoords="offset points")
            o = m["overall"]
            if o["mean_tokens"] is not None:
                ax.plot([o["mean_tokens"]], [100 * o["accuracy"]], "s", color=colour, ms=9, label=name)
        ax.set_title(bench)
        ax.set_xlabel("mean response tokens")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    return save_figure(plt, fig, png)



# ----------------------------------------------------------------------------------------------------------
# Generation: fixed chunks of records, seeded per chunk, spread over ranks, gathered on every rank.


def model_names(paths: list[str], names: list[str]) -> list[str]:
    """Display names: the given ones, else the folder name (with its parent for .../final and .../step_N)."""
    if names:
        return list(names)
    short = []
    for p in paths:
        parts = Path(p).parts
        tail = parts[-2:] if len(parts) >= 2 and (parts[-1] == "final" or parts[-1].startswith("step_")) else parts[-1:]
        short.append("/".join(tail) or p)
    return short if len(set(short)) == len(short) else [f"{k + 1}:{s}" for k, s in enumerate(short)]


def model_key(path: str, seed: int, commit: str | None = None) -> str:
    """What a model is called in the cache: the absolute folder with the weights it holds now, the hub name with the
    commit it is read at (`commit`: a new commit to the repository is a new model), or 'tiny' with its seed. The
    weights are named by the checkpoint's COMPLETE record (step and time, written by each save) or, for any other
    folder, the size and modification time of its files: a run retrained into the same folder (--overwrite) is a new
    model, never served the old one's responses."""
    if path == "tiny":
        return f"tiny:seed{seed}"
    folder = Path(path)
    if not folder.exists():
        return f"{path}@{commit}" if commit else path
    try:
        done = json.loads((folder / "COMPLETE").read_text())
        if done.get("time") is not None:
            return f"{folder.resolve()}@step{done.get('step')}:{done['time']}"
    except (OSError, ValueError, AttributeError):  # no COMPLETE, or another tool's marker: the files' stamps
        pass
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))
    stamp = hashlib.sha256(repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode()).hexdigest()
    return f"{folder.resolve()}@{stamp[:12]}"


def decoding_key(cfg: EvalConfig) -> str:
    """The decoding settings a response depends on (the seed only when sampling)."""
    if cfg.temperature <= 0:
        return f"greedy, max {cfg.max_new_tokens} new tokens"
    return f"T={cfg.temperature}, top-p={cfg.top_p}, seed={cfg.seed}, max {cfg.max_new_tokens} new tokens"


def settings_key(cfg: EvalConfig, model, processor) -> str:
    """Every flag that changes a response: the decoding settings, and how the model runs and sees images (the dtype
    it was loaded in, so --dtype auto is bf16 on a GPU and fp32 on the CPU; --attn; the image sizes its processor
    resizes to: --min-pixels and --max-pixels, or a tiny checkpoint's own when they are not given).
    --samples and --batch-size are left out on purpose: they change which random draw a sampled response is, not
    what it is drawn from, so a run with more --samples reuses the first ones; --max-prompt-len only decides which
    records are evaluated."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}  # None: a text-only model
    return (f"{decoding_key(cfg)}; dtype={dtype}, attn={cfg.attn}, min_pixels={size.get('shortest_edge', cfg.min_pixels)}, "
            f"max_pixels={size.get('longest_edge', cfg.max_pixels)}")


def image_digest(img) -> str:
    """sha256 of an image as a record keeps it (data_prep.image_source): a file's bytes, encoded bytes, or a PIL
    image's pixels."""
    if isinstance(img, str):
        data = Path(img).read_bytes()
    elif isinstance(img, (bytes, bytearray)):
        data = bytes(img)
    else:
        data = f"{img.mode} {img.size}".encode() + img.tobytes()
    return hashlib.sha256(data).hexdigest()


def record_key(processor, record: dict, image_digests: list[str]) -> str:
    """A record's content as the model and the grader see it: the prompt text (question, choices rendered into it,
    the model's instruction and chat template), the answer, and the bytes of each image (`image_digest`, taken once
    per benchmark). An edited record gets a new key, so its cached responses, and verdicts against the old answer,
    are not reused. (What else a verdict depends on, the grader's version and the record's options and precision,
    is kept with each response: `graded_by`; a cached response graded otherwise is graded again, not generated.)"""
    content = [data_prep.prompt_text(processor, record), record["answer"], image_digests]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def graded_by(record: dict) -> list:
    """What a verdict was taken with: the grader's version and the options and precision of the record (Gold)."""
    gold = data_prep.gold_of(record)
    return [data_prep.GRADER_VERSION, list(gold.choices), gold.precision]


def grade_again(lines: list[dict], records: dict, marks: dict) -> list[dict]:
    """Cached response lines whose verdict an older grader, or other options or precision, took: graded again
    (`marks`: each record's graded_by now)."""
    golds = [data_prep.gold_of(records[x["id"]]) for x in lines]
    preds = [data_prep.extract_boxed(x["response"]) for x in lines]
    return [dict(x, prediction=p, correct=c, graded_by=marks[x["id"]])
            for x, p, c in zip(lines, preds, data_prep.grade_batch(preds, golds, workers=0))]


def response_key(model: str, bench: str, rid: str, sample: int, settings: str, content: str) -> str:
    """A response's name in the cache (module docstring): model_key, the benchmark's key, the record id, the sample
    index, settings_key and record_key."""
    return json.dumps([model, bench, rid, sample, settings, content])


def chunk_seed(seed: int, bench: str, ids: list[str]) -> int:
    """A stable 63-bit seed from --seed, the benchmark and the chunk's record ids (Python's hash() is salted)."""
    digest = hashlib.sha256(json.dumps([seed, bench, ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generate_chunk(model, processor, ids: dict, chunk: list[dict], cfg: EvalConfig, seed: int) -> list[dict]:
    """One sampler call: len(chunk) prompts x --samples responses, graded. -> one line per response."""
    device = next(model.parameters()).device
    prompts = data_prep.encode_prompts(processor, chunk)
    gen = torch.Generator(device).manual_seed(seed)
    out = ares.sample(model, prompts, ids=ids, max_new_tokens=cfg.max_new_tokens, repeats=cfg.samples,
                      temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
    return response_lines(chunk, out, data_prep.tokenizer_of(processor), cfg.samples)


def generate_or_report(model, processor, ids, chunk, cfg, bench_key) -> tuple[list[dict], list[dict]]:
    """generate_chunk, but an error costs only the records that cause it: a failing chunk is retried one record
    at a time, and a record that still fails is returned as a failure. -> (lines, failures)."""
    try:
        return generate_chunk(model, processor, ids, chunk, cfg, chunk_seed(cfg.seed, bench_key, [r["id"] for r in chunk])), []
    except Exception as e:  # noqa: BLE001 - one bad record (or an out-of-memory batch) must not end the run
        if isinstance(e, getattr(torch, "AcceleratorError", ())) or str(e).startswith("CUDA error"):
            # a device-side assert or a bad memory access leaves the GPU unusable in this process: every later record
            # would fail the same way and be counted wrong
            raise SystemExit(f"eval: the GPU failed on benchmark {bench_key} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}): it cannot go on in this process. The responses so far are in "
                             "--out's responses.jsonl: the same command continues from them") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(chunk) == 1:
            return [], [dict(id=chunk[0]["id"], error=f"generation failed: {type(e).__name__}: {e}")]
    lines, failures = [], []
    for rec in chunk:
        got, bad = generate_or_report(model, processor, ids, [rec], cfg, bench_key)
        lines += got
        failures += bad
    return lines, failures


def end_last_line(path: Path):
    """Before appending to responses.jsonl: a last line a kill left without its newline is ended (whole JSON) or cut
    off (a fragment, which read_cache skipped), so the first appended line starts a line of its own. Reads the file
    back from its end to the last newline only, not the whole file again."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = start = f.seek(0, os.SEEK_END)
        while start > 0:  # back a block at a time, each read once, until a block holds a newline
            start = max(0, start - (1 << 16))
            f.seek(start)
            block = f.read(end - start)
            if b"\n" in block:
                start += block.rindex(b"\n") + 1
                break
            end = start
        f.seek(start)
        tail = f.read()
        if not tail:  # empty, or it ends with a newline
            return
        try:
            json.loads(tail)
        except ValueError:
            f.truncate(start)
        else:
            f.write(b"\n")


def read_cache(path: Path) -> dict:
    """key -> response line of an earlier run (a line cut short by a crash, one with a byte that is not UTF-8, or one
    that is not a response, is skipped)."""
    cache = {}
    if path.is_file():
        for line in open(path, "rb"):  # a damaged byte skips its line, not the whole read: inside a text value too
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):  # else not a response line: damaged, edited
                cache[row["key"]] = row
    return cache


def run_benchmark(model, processor, ids: dict, name: str, mkey: str, bench: dict, cfg: EvalConfig, cache: dict,
                  writer) -> tuple[dict, list[dict], int, int]:
    """One model on one benchmark: generate what the cache lacks (chunks dealt round-robin to ranks, gathered on
    every rank after each round, appended to responses.jsonl by rank 0), then summarize.
    -> (summary, failures, responses generated, responses reused)."""
    rank, world = ares.rank(), ares.world_size()
    decoding, settings = decoding_key(cfg), settings_key(cfg, model, processor)
    usable, failed = check_prompts(processor, bench["records"], cfg.max_prompt_len)
    by_id = {r["id"]: r for r in usable}
    marks = {rid: graded_by(r) for rid, r in by_id.items()}
    content = {r["id"]: record_key(processor, r, bench["image_digests"][r["id"]]) for r in usable}
    key = lambda rid, k: response_key(mkey, bench["key"], rid, k, settings, content[rid])  # noqa: E731
    labels = {r["id"]: bucket_of(r, bench["field"]) for r in bench["records"]}
    # a failed row's level is its own: it may share its id with a usable record (one copy of a record bad), which
    # must keep its responses and level
    failed = [dict(id=f["id"], error=f["error"], bucket=bucket_of(f["row"], bench["field"])) for f in bench["failures"]] \
        + [dict(f, bucket=labels[f["id"]]) for f in failed]
    lost = set()  # usable records whose generation failed: no responses
    chunks = [usable[i:i + cfg.batch_size] for i in range(0, len(usable), cfg.batch_size)]  # fixed by the data alone
    todo = [c for c in chunks if any(key(r["id"], k) not in cache for r in c for k in range(cfg.samples))]
    n_cached = sum(key(r["id"], k) in cache for r in usable for k in range(cfg.samples))
    n_new = 0
    bar = tqdm(total=sum(map(len, todo)), desc=f"{name} | {bench['name']}", disable=rank != 0, dynamic_ncols=True)
    for start in range(0, len(todo), world):  # one round: every rank one chunk, then gather
        mine = todo[start + rank] if start + rank < len(todo) else []
        # the sampling seed comes from the benchmark's name, not its path: the same file anywhere draws the same
        lines, bad = (generate_or_report(model, processor, ids, mine, cfg, bench.get("seed_name", bench["name"]))
                      if mine else ([], []))
        lines, bad = gather(lines), gather(bad)
        failed += [dict(f, bucket=labels[f["id"]]) for f in bad]
        lost.update(f["id"] for f in bad)
        new = []
        for line in lines:
            line = dict(key=key(line["id"], line["sample"]), model=name, model_path=mkey, benchmark=bench["name"],
                        benchmark_key=bench["key"], decoding=decoding, graded_by=marks[line["id"]], **line)
            if line["key"] in cache:  # a chunk regenerated for a missing sample: keep what was cached
                continue
            cache[line["key"]] = line
            new.append(json.dumps(line) + "\n")
        n_new += len(new)
        if writer:
            data_prep.append_lines(writer, new)  # flushed: a crash loses at most one round
        bar.update(sum(map(len, todo[start:start + world])))
    bar.close()
    cached = [cache[key(r["id"], k)] for r in usable for k in range(cfg.samples) if key(r["id"], k) in cache]
    stale = [x for x in cached if x.get("graded_by") != marks[x["id"]]]  # a line of before graded_by too
    again = grade_again(stale, by_id, marks) if stale else []  # every rank grades them; rank 0 appends the new verdicts
    for line in again:
        cache[line["key"]] = line
    if again and writer:
        data_prep.append_lines(writer, [json.dumps(line) + "\n" for line in again])
    responses = [dict(cache[key(r["id"], k)], bucket=labels[r["id"]]) for r in usable if r["id"] not in lost
                 for k in range(cfg.samples)]
    return summarize(responses, failed, cfg.samples, bench["field"]), failed, n_new, n_cached


def load_with_key(path: str, load_cfg, device, seed: int):
    """The model in `path`, its processor, and the cache key of the weights it holds (model_key), the same on every
    rank. A training run that saves into the folder while it loads would file one model's responses under the other's
    key, and serve them again as the new model's: that stops the evaluation instead. A hub model is read at the
    commit its name points to when it loads (ares.hub_commit), and its responses are cached under that commit."""
    commit = None if path == "tiny" or Path(path).exists() else ares.hub_commit(path)
    key = model_key(path, seed, commit)
    model, processor = ares.load_model(path, load_cfg, device, revision=commit)
    seen = {key, model_key(path, seed, commit)}  # before and after the load
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, seen)
        seen = set().union(*every)
    if len(seen) > 1:
        raise SystemExit(f"--model {path} changed while it loaded (a run saved a checkpoint into it): run the same "
                         "command again once that save is done")
    return model, processor, key


def distinct_names(benches: list[dict]) -> None:
    """Two files called test.jsonl: keep both apart in the table and the JSON, as test#1 and test#2 (their place
    among the --data). The counts are taken before any is renamed: counted as it went, the last of them kept the
    bare name (test#1 and test). Each keeps its stem as `seed_name`, which seeds its sampling: the same file draws
    the same responses whether or not another file of that name is evaluated beside it."""
    stems = [b["name"] for b in benches]
    for k, b in enumerate(benches):
        b["seed_name"] = b["name"]
        if stems.count(b["name"]) > 1:
            b["name"] = f"{b['name']}#{k + 1}"


def evaluate(cfg: EvalConfig) -> dict:
    """Run every model on every benchmark and return the results dict (on every rank; rank 0 writes the files)."""
    benches = [load_benchmark(spec, cfg) for spec in cfg.data]  # a missing dataset stops before --out is made
    rank, world, device = ares.init_distributed()  # after the data: its errors are every rank's (one_line_per_node)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = read_cache(out / "responses.jsonl")
    ares.barrier()  # every rank has read the cache before rank 0 appends to it
    distinct_names(benches)
    for b in benches:
        b["field"] = bucket_field(b["records"] + [f["row"] for f in b["failures"]], cfg.bucket_by)
    names, decoding = model_names(cfg.model, cfg.name), decoding_key(cfg)
    load_cfg = ares.Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ares.ModelConfig)}, seed=cfg.seed,
                           given=cfg.given)
    if rank == 0:
        end_last_line(out / "responses.jsonl")
    writer = open(out / "responses.jsonl", "a") if rank == 0 else None
    metrics, failures, counts = {b["name"]: {} for b in benches}, [], dict(generated=0, cached=0)
    keys = []
    for path, name in zip(cfg.model, names):
        model, processor, mkey = load_with_key(path, load_cfg, device, cfg.seed)
        keys.append(mkey)
        model.eval()
        ids = ares.special_ids(model, processor)
        for b in benches:
            t0 = time.time()
            summary, failed, n_new, n_cached = run_benchmark(model, processor, ids, name, mkey, b,
                                                             cfg, cache, writer)
            metrics[b["name"]][name] = summary
            failures += [dict(model=name, benchmark=b["name"], **f) for f in failed]
            counts["generated"] += n_new
            counts["cached"] += n_cached
            ares.rank0_print(f"{name} on {b['name']}: {n_cached} responses from the cache, {n_new} generated, "
                             f"{len(failed)} failed records ({time.time() - t0:.0f}s)")
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if writer:
        writer.close()
    table = "\n\n".join(bench_table(b["name"], metrics[b["name"]], names, decoding) for b in benches)
    if failures:
        table += f"\n\n{len(failures)} failed records (counted as wrong; all in results.json):\n" + "\n".join(
            f"  {f['model']} | {f['benchmark']} | {f['id']}: {f['error']}" for f in failures[:10])
        table += "\n  ..." if len(failures) > 10 else ""
    results = dict(config=dataclasses.asdict(cfg), world_size=world, decoding=decoding,
                   models=[dict(name=n, path=p, key=k) for n, p, k in zip(names, cfg.model, keys)],
                   benchmarks={b["name"]: dict(key=b["key"], records=len(b["records"]) + len(b["failures"]),
                                               bucket_field=b["field"]) for b in benches},
                   metrics=metrics, failures=failures, table=table, **counts)
    if rank == 0:
        data_prep.write_atomically(out / "results.json", json.dumps(results, indent=2))
    return results


def compare(models: list[str], data: str, out: Path, names: list[str] | None = None, max_new_tokens: int = 96,
            temperature: float = 0.0, top_p: float = 1.0, samples: int = 1, batch_size: int = 64) -> dict:
    """Evaluate `models` on one benchmark file and return the results dict; results['table'] is the printed table
    (per difficulty level and overall: accuracy and mean response tokens of each model, and the difference).
    Works in one process and when every torchrun rank calls it (each rank gets the same dict)."""
    cfg = EvalConfig(model=[str(m) for m in models], name=list(names or []), data=[str(data)], out=str(out),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, samples=samples,
                     batch_size=batch_size)
    return evaluate(cfg)


def evaluate_and_report(cfg: EvalConfig):
    if cfg.demo:
        print(demo_summary(cfg.demo))
        return None
    results = evaluate(cfg)
    if ares.rank() == 0:
        print("\n" + results["table"] + f"\n\nwritten: {Path(cfg.out) / 'results.json'}, "
              f"{Path(cfg.out) / 'responses.jsonl'}", flush=True)
        if cfg.plot and plot_results(results, Path(cfg.plot)):
            print(f"plot: {cfg.plot}", flush=True)



# ----------------------------------------------------------------------------------------------------------
# passrate: p(x) = (correct responses) / K from K samples of a reference model (AdaCS step 1, paper §3.1).
# It samples with ares.py's sampler, so it lives here, above ares.py.


def rank_batches(n: int, batch: int, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """[(batch number, record indices)] of this rank: consecutive global batches dealt round-robin, so the
    batches, and the responses sampled with a generator seeded per batch, do not depend on the world size.
    rank_batches(5, 2, 1, 2) == [(1, [2, 3])]."""
    return [(b, list(range(s, min(s + batch, n)))) for b, s in enumerate(range(0, n, batch)) if b % world == rank]


def sample_traces(model, processor, records: list[dict], args, rank: int, world: int, device) -> dict[int, list]:
    """{record index: K traces (response, length, correct)} for this rank's records; None for a prompt longer
    than --max-prompt-len."""
    import torch

    ids, tok = ares.special_ids(model, processor), data_prep.tokenizer_of(processor)
    stop = set(ids["stop"])
    results = {}
    for b, idx in tqdm(rank_batches(len(records), args.batch_size, rank, world), desc="passrate", disable=rank != 0):
        prompts, kept = [], []
        recs = [dict(records[i], images=[data_prep.open_image(im, Path(".")) for im in records[i]["images"]]) for i in idx]
        for i, enc in zip(idx, data_prep.encode_prompts(processor, recs)):
            if len(enc["ids"]) > args.max_prompt_len:
                results[i] = None
                continue
            prompts.append(enc)
            kept.append(i)
        if not prompts:
            continue
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + b)
        out = ares.sample(model, prompts, ids=ids, max_new_tokens=args.max_new_tokens, repeats=args.k,
                          temperature=args.temperature, top_p=args.top_p, generator=gen)
        lengths = out["mask"].sum(1).tolist()  # (N,) sampled tokens, the stop token included
        for j, i in enumerate(kept):
            texts, lens = [], []
            for row in range(j * args.k, (j + 1) * args.k):
                toks = out["tokens"][row, :lengths[row]].tolist()
                lens.append(len(toks) - (bool(toks) and toks[-1] in stop))  # the end-of-turn token is not reasoning
                texts.append(tok.decode(toks, skip_special_tokens=True))
            results[i] = [dict(response=t, length=n, correct=c)
                          for t, n, c in zip(texts, lens, data_prep.grade(texts, data_prep.gold_of(records[i])))]
    return results


def check_passrate_args(args):
    """eval.py passrate's flags, one line naming the first bad one, before the data or the model is read."""
    ares.check_model_path("--model", args.model)
    temperatures, temperature_ok = ares.GREEDY_OR_SAMPLED_T
    for flag, ok, need in (("--k", args.k >= 1, ">= 1"), ("--limit", args.limit is None or args.limit >= 1, ">= 1"),
                           ("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
                           ("--batch-size", args.batch_size >= 1, ">= 1"),
                           ("--max-prompt-len", args.max_prompt_len >= 1, ">= 1"),
                           ("--temperature", math.isfinite(args.temperature) and temperature_ok(args.temperature),
                            temperatures),
                           ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
                           ("--seed", ares.SEED[1](args.seed), ares.SEED[0])):
        if not ok:
            raise SystemExit(f"{flag} must be {need}, got {getattr(args, flag[2:].replace('-', '_'))}")
    data_prep.check_split_flags(args.data, split=args.split)
    if args.k > 1 and args.temperature == 0:  # as the evaluation's --samples
        raise SystemExit("--k > 1 needs --temperature > 0 (greedy responses would all be the same: every pass rate "
                         "0 or 1)")
    ares.check_attn(args.attn)
    ares.check_numbers(passrate_load_config(args), hints={})  # --min-pixels, --max-pixels: ares.py's ranges and lines
    data_prep.check_records_out(args.out, {"--data": args.data}, args.overwrite)  # its checkpoint and run checks too


def passrate_load_config(args) -> ares.Config:
    """How passrate loads --model: ares.py's --dtype, --attn, --min-pixels and --max-pixels. A pixel flag left out
    (None) takes ares.py's default, and is not in `given`: a tiny checkpoint then keeps its own size, as in training."""
    pixels = {name: v for name in ("min_pixels", "max_pixels") if (v := getattr(args, name)) is not None}
    return ares.Config(model=args.model, dtype=args.dtype, attn=args.attn, seed=args.seed, **pixels,
                       given=tuple(pixels))


def run_passrate(args) -> list[dict] | None:
    check_passrate_args(args)
    records = data_prep.check_problems(data_prep.load_source(args.data, preset=args.preset, split=args.split,
                                                             limit=args.limit), args.data)
    rank, world, device = ares.init_distributed()  # after the data: its errors are every rank's (one_line_per_node)
    cfg = passrate_load_config(args)
    processor = ares.training_processor(cfg, None)  # training's images; a pixel flag for a text-only model stops here
    model, processor = ares.load_model(args.model, cfg, device, processor=processor)
    traces_of = sample_traces(model.eval(), processor, records, args, rank, world, device)
    if world > 1:  # every rank's traces to rank 0, which writes the output
        parts = [None] * world
        dist.all_gather_object(parts, traces_of)
        traces_of = {i: t for part in parts for i, t in part.items()}
    out = write_pass_rates(records, traces_of, args, world) if rank == 0 else None
    ares.barrier()  # both ranks close the process group together (a rank leaving early can abort in gloo's teardown)
    return out


def write_pass_rates(records: list[dict], traces_of: dict, args, world: int) -> list[dict]:
    """Rank 0: the records with their pass_rate (and with --keep-responses every trace), written to --out; a table."""
    out, skipped = [], 0
    for i, rec in enumerate(records):
        traces = traces_of[i]
        if traces is None:
            skipped += 1
            continue
        p = sum(t["correct"] for t in traces) / args.k
        out += [dict(rec, **t, pass_rate=p) for t in traces] if args.keep_responses else [dict(rec, pass_rate=p)]
    data_prep.write_records(out, Path(args.out), copy_images=False)
    by = defaultdict(list)
    for traces in traces_of.values():
        if traces is not None:
            by[sum(t["correct"] for t in traces)].append(statistics.mean(t["length"] for t in traces))
    rows = [[f"{c}/{args.k}", len(by[c]), statistics.mean(by[c]) if by[c] else "-"] for c in range(args.k + 1)]
    print(data_prep.table(["pass rate", "problems", "mean tokens"], rows))
    print(f"{len(records) - skipped} problems x K={args.k} on {world} process(es), {skipped} skipped "
          f"(prompt > {args.max_prompt_len} tokens); wrote {len(out)} records to {args.out}")
    return out


def passrate_parser() -> argparse.ArgumentParser:
    pr = data_prep.OneLineParser(prog="eval.py passrate", description="sample K responses per problem from a model "
                                 "and grade them: pass_rate (AdaCS step 1)")
    pr.add_argument("--data", required=True, help="records: a file, folder, hub name or preset name")
    pr.add_argument("--preset", choices=sorted(data_prep.PRESETS), help="read --data with this preset's mapping")
    pr.add_argument("--split", help="split to read")
    pr.add_argument("--limit", type=int, help="only the first N problems")
    pr.add_argument("--model", required=True, help="reference model: hub name, local folder or 'tiny'")
    pr.add_argument("--k", type=int, default=8, help="responses per problem (default: 8)")
    pr.add_argument("--max-new-tokens", type=int, default=4096, help="response budget in tokens (default: 4096)")
    pr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    pr.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    pr.add_argument("--batch-size", type=int, default=8, help="problems per sampler call (x K rows; default: 8)")
    pr.add_argument("--max-prompt-len", type=int, default=4096, help="skip prompts longer than this (default: 4096)")
    pr.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    pr.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="model dtype")
    pr.add_argument("--attn", default="sdpa", choices=ares.ModelConfig.__dataclass_fields__["attn"].metadata["choices"],
                    help="attention kernel (default: sdpa)")  # ares.py's choices
    for name in ("min_pixels", "max_pixels"):  # ares.py's help and default; None: not given (passrate_load_config)
        f = ares.ModelConfig.__dataclass_fields__[name]
        pr.add_argument("--" + name.replace("_", "-"), type=int, metavar="INT", help=f"{f.metadata['help']} (default: "
                        f"{f.default}); give training's, so the pass rates come from the images it trains on")
    pr.add_argument("--keep-responses", action="store_true",
                    help="write every response (with length and correct) as a candidate trace, K records per problem")
    pr.add_argument("--out", required=True, help="output .jsonl or .parquet")
    pr.add_argument("--overwrite", action="store_true", help="replace --out (and its images) if it exists")
    return pr



# ----------------------------------------------------------------------------------------------------------
# Curves of AEPO runs (`eval.py curves <out>/metrics.jsonl`) and the explore page (where ARES explores).


def curves_parser() -> argparse.ArgumentParser:
    pc = data_prep.OneLineParser(prog="eval.py curves", description="draw an AEPO run's curves (reward, accuracy, "
                                 "response tokens and N_HE per level, tau, kappa, ...) into curves.png beside its "
                                 "metrics.jsonl (needs matplotlib)")
    pc.add_argument("metrics", help="an AEPO run's metrics.jsonl, e.g. runs/ares/aepo/metrics.jsonl")
    return pc


def run_curves(args):
    """eval.py curves: one line naming the path when it is not an AEPO run's metrics.jsonl; else the png's path."""
    path = Path(args.metrics)
    if path.is_dir():
        hint = f" ({path / 'metrics.jsonl'})" if (path / "metrics.jsonl").is_file() else ""
        raise SystemExit(f"curves {path}: a folder; give an AEPO run's metrics.jsonl{hint}")
    if not path.is_file():
        raise SystemExit(f"curves {path}: no such file; give an AEPO run's metrics.jsonl")
    rows = ares.logged_rows(path, warn=False)
    if not rows:  # another JSONL file: one line, not a warning for each of its lines
        raise SystemExit(f"curves {path}: no AEPO step rows in it; give an AEPO run's metrics.jsonl")
    if problem := curve_problem(rows):
        raise SystemExit(f"curves {path}: {problem}; give an AEPO run's metrics.jsonl")
    keys = {k for _, ks in curve_panels(rows) for k in ks}
    if not any(r.get(k) is not None for r in rows for k in keys):  # nine empty panels otherwise
        raise SystemExit(f"curves {path}: none of its {len(rows)} step rows has a value the curves draw (reward, acc, "
                         "tau, ...): a cold-start run's log?; give an AEPO run's metrics.jsonl")
    png = path.with_name("curves.png")
    if png.is_dir():  # written over the file there (atomically), never into a folder of the user's
        raise SystemExit(f"curves {path}: {png} is a folder, where the curves are written: move it")
    if plot_curves(path, png):
        print(f"curves: {png}", flush=True)


def moving_mean(values: list[float], k: int) -> list[float]:
    """Mean of the finite values among the last k at each position (NaN where all k are NaN, a gap in the curve):
    moving_mean([1, nan, nan, 4], 2) == [1, 1, nan, 4]."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1):i + 1] if v == v]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def run_levels(rows: list[dict]) -> list[str]:
    """The difficulty labels an AEPO run logged (level_<label>_len keys), in the table's order (bucket_order)."""
    labels = {k[len("level_"):-len("_len")] for r in rows for k in r if k.startswith("level_") and k.endswith("_len")}
    return sorted(labels, key=bucket_order)


def curve_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """plot_curves' panels, (title, keys of the rows), for a run's rows (the first run's, when it draws several)."""
    levels = run_levels(rows)
    per = (lambda key: [f"level_{lv}_{key}" for lv in levels]) if levels else (
        lambda key: [f"{key}_{b}" for b in ares.BUCKETS])
    by = "level" if levels else "bucket"
    by_bucket = lambda key: [f"{key}_{b}" for b in ares.BUCKETS]  # noqa: E731
    panels = [("reward / accuracy", ["reward", "acc"]), (f"response tokens per {by}", per("len")),
              (f"N_HE per response, per {by}", per("n_he")), (f"accuracy per {by}", per("acc")), ("tau", ["tau"]),
              ("kappa (KL controller)", by_bucket("kappa")), ("N_HE per response, per online bucket", by_bucket("n_he")),
              ("share of responses branched, per online bucket", by_bucket("branched")),
              ("KL outside HWE windows, per online bucket", by_bucket("kl_outside"))]
    evals = sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_acc")})
    if evals:  # --eval-data: held-out accuracy and length, overall and per level
        panels += [("held-out accuracy (--eval-data)", evals), ("held-out response tokens", [k[:-4] + "_len" for k in evals])]
    return panels


def curve_problem(rows: list[dict]) -> str | None:
    """The first value of a run's rows that the curves plot (or bucket_shares counts) and that is not a number (null is
    a gap), or None: matplotlib would end in a TypeError."""
    keys = {k for _, ks in curve_panels(rows) for k in ks}
    for r in rows:
        for k, v in r.items():
            read = k in keys or k.startswith("level_") and "_groups_" in k  # bucket_shares sums the groups
            if read and v is not None and not isinstance(v, (int, float)):
                return f"step {r['step']}: {k} is {data_prep.shown(v)}, not a number"
    return None


def plot_curves(runs: dict[str, Path] | Path, png: Path) -> bool:
    """AEPO curves of one or several runs ({name: metrics.jsonl}; solid, dashed, dotted lines in run order): reward
    and accuracy, and per difficulty level (per online bucket when the records have no level) response length,
    N_HE and accuracy, then tau and kappa, and per online bucket (App. G) N_HE, the share of branched responses and
    the KL outside HWE windows (the controller's signal), and with ares.py's --eval-data the held-out accuracy and
    response tokens per level (points at the validated steps). Each step faint, a 10-step moving mean on top (needs
    matplotlib)."""
    plt = pyplot("curves.png")
    if plt is None:
        return False
    runs = runs if isinstance(runs, dict) else {"": runs}
    data = {name: ares.logged_rows(Path(path)) for name, path in runs.items()}
    panels = curve_panels(next(iter(data.values())))
    cols = math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(3, cols, figsize=(4.7 * cols, 11))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for (name, rows), style in zip(data.items(), ("-", "--", ":", "-.")):
            steps = [r["step"] for r in rows]
            for colour, k in enumerate(keys):
                if k.startswith("eval_"):  # only the validated steps: a point each
                    done = [r for r in rows if r.get(k) is not None]
                    ax.plot([r["step"] for r in done], [r[k] for r in done], style, marker="o", color=f"C{colour}",
                            label=k.removeprefix("eval_") + (f" ({name})" if name else ""))
                    continue
                raw = [r.get(k) if r.get(k) is not None else float("nan") for r in rows]
                ax.plot(steps, raw, style, color=f"C{colour}", alpha=0.15)
                label = k.removeprefix("level_") + (f" ({name})" if name else "")
                ax.plot(steps, moving_mean(raw, 10), style, color=f"C{colour}", label=label,
                        marker="o" if len(steps) == 1 else None)  # a line of one point is drawn as nothing
        ax.set_title(title)
        ax.set_xlabel("AEPO step")
        ax.legend(fontsize=6)
    return save_figure(plt, fig, png)


def bucket_shares(metrics_file: Path, part: float = 1.0) -> dict:
    """Over the first `part` of a run's AEPO steps (default: all): per difficulty level, the share of its groups in
    each online bucket (App. G)."""
    rows = ares.logged_rows(Path(metrics_file))
    rows = rows[:math.ceil(len(rows) * part)]
    shares = {}
    for lv in run_levels(rows):
        n = {b: sum(r.get(f"level_{lv}_groups_{b}") or 0 for r in rows) for b in ares.BUCKETS}  # null: a gap
        total = sum(n.values())
        shares[lv] = {b: n[b] / total if total else None for b in ares.BUCKETS}
    return shares


EXPLORE_CSS = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;color:#222}
.r{font-family:monospace;font-size:13px;line-height:1.9;margin:.2em 0 .2em 0;white-space:pre-wrap}
.t{border-radius:3px;padding:1px 0}.h{outline:2px solid #c00;font-weight:bold}.p{opacity:.35}
.b{color:#06c;font-weight:bold}.l{font-size:12px;color:#555;margin-top:.6em}.ok{color:#080}.no{color:#c00}
table{table-layout:fixed;width:100%}td{vertical-align:top;padding:0 1em}h3{margin-bottom:.2em}"""


def explore_rows(model, processor, records: list[dict], cfg, seed: int) -> tuple[list[list[dict]], float]:
    """One branching rollout group (ares.rollout_groups) per record, all in one call as in a training step (tau is
    the step's, over every record's fresh samples), with each token's window entropy and HWE flag: per record
    [{tokens, hbar, hwe, parent, branch_at, correct, n_he}] (parent: a row of the same group), and tau."""
    ids, tok, G = ares.special_ids(model, processor), data_prep.tokenizer_of(processor), cfg.group_size
    prompts = [data_prep.encode_prompt(processor, dict(r, images=[data_prep.open_image(im) for im in r["images"]]))
               for r in records]
    gen = torch.Generator().manual_seed(seed)
    triggers = ares.trigger_table(processor, model.config.get_text_config().vocab_size) if cfg.trigger_words else None
    ro = ares.rollout_groups(model, prompts, cfg, ids, gen, triggers)
    hbar, valid = ares.window_entropy(ro.entropy, ro.resp_mask, cfg.window)
    hwe = ares.hwe_mask(hbar, valid, ro.tau[:, None], ro.tokens, triggers)  # as the run counted (--trigger-words)
    groups = []
    for p, record in enumerate(records):
        rows = []
        for i in range(p * G, (p + 1) * G):
            n = int(ro.resp_mask[i].sum())
            toks = ro.tokens[i, :n].tolist()
            text = tok.decode(toks, skip_special_tokens=True)
            parent = int(ro.parent[i])
            rows.append(dict(tokens=[tok.decode([t]) for t in toks], hbar=hbar[i, :n].tolist(), hwe=hwe[i, :n].tolist(),
                             parent=parent - p * G if parent >= 0 else -1, branch_at=int(ro.branch_at[i]),
                             n_he=int(hwe[i].sum()),
                             correct=data_prep.is_correct(data_prep.extract_boxed(text), data_prep.gold_of(record))))
        groups.append(rows)
    return groups, ro.tau[0].item()


def explore_html(rows: list[dict], tau: float) -> str:
    """One group as HTML: each token shaded by its window entropy (darker = higher, scaled to 2 tau), HWE tokens
    (Hbar >= tau) outlined, a branch's inherited prefix faded and its branch point marked with a blue bar."""
    import html

    out = []
    for i, r in enumerate(rows):
        where = f" branched from #{r['parent']} at token {r['branch_at']}" if r["parent"] >= 0 else ""
        verdict = '<span class="ok">right</span>' if r["correct"] else '<span class="no">wrong</span>'
        out.append(f'<div class="l">#{i}{where}: {verdict}, {len(r["tokens"])} tokens, N_HE = {r["n_he"]}</div>'
                   '<div class="r">')
        for t, (piece, h, m) in enumerate(zip(r["tokens"], r["hbar"], r["hwe"])):
            if r["parent"] >= 0 and t == r["branch_at"]:
                out.append('<span class="b">|</span>')
            alpha = min(1.0, h / (2 * tau)) if tau > 0 else 0.0
            cls = "t" + (" h" if m else "") + (" p" if r["parent"] >= 0 and t < r["branch_at"] else "")
            out.append(f'<span class="{cls}" style="background:rgba(255,120,0,{alpha:.2f})" '
                       f'title="window entropy {h:.3f}">{html.escape(piece)}</span>')
        out.append("</div>")
    return "".join(out)


def explore_page(models: list, names: list[str], data: Path, html_out: Path, cfg, per_level: int = 2) -> Path:
    """A self-contained HTML page: for `per_level` held-out problems of each difficulty level, one branching rollout
    group of every model side by side (a model's groups sampled together, as one AEPO step samples its prompts), tokens
    shaded by window entropy (Eq. 4), HWE tokens and branch points marked."""
    import html

    records = data_prep.load_records(str(data))
    levels = sorted({str(r["difficulty"]) for r in records}, key=bucket_order)
    picked = [r for lv in levels for r in [x for x in records if x["difficulty"] == lv][:per_level]]
    cells, taus = {}, {}
    for m, name in zip(models, names):
        model, processor = ares.load_model(str(m), cfg, torch.device("cpu"))
        groups, taus[name] = explore_rows(model.eval(), processor, picked, cfg, seed=cfg.seed)
        cells.update({(name, rec["id"]): rows for rec, rows in zip(picked, groups)})
    body = [f"<h1>Where ARES explores</h1><p>Each row is one response of a group of G = {cfg.group_size}: "
            f"{cfg.group_size - cfg.branch_samples} sampled from the prompt, {cfg.branch_samples} branched at the "
            f"highest window-entropy tokens (§3.2; README: branching rollouts). Shading: window entropy over w = {cfg.window} tokens (darker = "
            "more uncertain); outlined: HWE tokens (window entropy &ge; tau, the step's threshold); faded: a branch's "
            "prefix, inherited from its parent; blue bar: where the branch starts sampling. Hover a token for its "
            "window entropy.</p>"]
    for rec in picked:
        body.append(f"<h3>{html.escape(rec['difficulty'])}: {html.escape(rec['question'])} (answer "
                    f"{html.escape(rec['answer'])})</h3><table><tr>")
        for name in names:
            body.append(f"<td><b>{html.escape(name)}</b> (tau = {taus[name]:.3f})"
                        f"{explore_html(cells[name, rec['id']], taus[name])}</td>")
        body.append("</tr></table>")
    data_prep.write_atomically(html_out, f"<!doctype html><meta charset='utf-8'><title>Where ARES explores</title>"
                               f"<style>{EXPLORE_CSS}</style>{''.join(body)}")
    return html_out



# ----------------------------------------------------------------------------------------------------------
# The demo's report (`eval.py demo-report <out>`, the last command of `python ares.py`), and the summary of
# several seeds (`eval.py --demo runs/seed0 --demo runs/seed1 ...`).


DEMO_FILES = {"data/test.jsonl": "data", "coldstart/final": "coldstart",  # what demo_report reads -> the stage of
              "aepo/config.json": "aepo", "aepo/metrics.jsonl": "aepo", "aepo/final": "aepo",  # run_demo that writes
              "grpo/metrics.jsonl": "aepo", "eval_greedy/results.json": "eval",  # it, in the order they run
              "eval_sampled/results.json": "eval", "stage_times.json": "eval"}  # (stage_times: right after eval)


def demo_report_parser() -> argparse.ArgumentParser:
    pd = data_prep.OneLineParser(prog="eval.py demo-report", description="the report of a `python ares.py` run: "
                                 "demo.json, curves.png and explore.html in its folder, and its tables printed")
    pd.add_argument("out", help="the --out folder of a finished `python ares.py` run, e.g. runs/ares")
    return pd


def run_demo_report(args) -> dict:
    """eval.py demo-report: one line naming the folder, or the first file of the run it lacks (in a demo that stopped,
    the stage that did not finish), before anything loads."""
    out = Path(args.out)
    if not out.is_dir():
        raise SystemExit(f"demo-report {out}: {'a file' if out.exists() else 'no such folder'}; give the --out folder "
                         "of a `python ares.py` run")
    missing = next((f for f in DEMO_FILES if not (out / f).exists()), None)
    if missing and any((out / f).exists() for f in DEMO_FILES):  # a demo that stopped: its first stage not finished
        raise SystemExit(f"demo-report {out}: the demo stopped before its {DEMO_FILES[missing]} stage finished (no "
                         f"{missing}): run it again with --overwrite (the same `python ares.py` command; it starts "
                         "over and ends with this report)")
    if missing:
        raise SystemExit(f"demo-report {out}: no {missing} in it; give the --out folder of a finished `python ares.py` "
                         "run")
    if problem := demo_run_problem(out):
        raise SystemExit(f"demo-report {out}: {problem}; give the --out folder of a finished `python ares.py` run")
    return demo_report(out)


def demo_run_problem(out: Path) -> str | None:
    """What demo_report would end in a KeyError or TypeError on, in the files of a run that has them all: a JSON file
    without what it reads, or a value the curves plot that is not a number. None when there is none."""
    need = {"eval_greedy/results.json": ("its 'table' text", lambda v: isinstance(v.get("table"), str)),
            "eval_sampled/results.json": ("its 'table' text", lambda v: isinstance(v.get("table"), str)),
            "stage_times.json": ("seconds per stage", lambda v: all(isinstance(t, (int, float)) for t in v.values())),
            "aepo/config.json": ("the run's 'flags'", lambda v: isinstance(v.get("flags"), dict))}
    for name, (what, ok) in need.items():
        try:
            value = json.loads((out / name).read_bytes())
        except ValueError as e:  # not JSON, or not UTF-8
            return f"{name} is not JSON ({str(e).splitlines()[0][:80]})"
        if not isinstance(value, dict) or not ok(value):
            return f"{name} lacks {what}"
    for name in ("aepo/metrics.jsonl", "grpo/metrics.jsonl"):
        if problem := curve_problem(ares.logged_rows(out / name, warn=False)):
            return f"{name}: {problem}"
    return None


def demo_report(out: Path) -> dict:
    """The report of a `python ares.py` run in `out`: <out>/demo.json (both evaluations, the stage times, per level the
    share of its groups in each online bucket, for ARES over all and over the first half of the steps, for GRPO over
    all), curves.png (ARES and GRPO over the AEPO steps) and explore.html (where
    ARES explores, with the AEPO run's own flags from its run record)."""
    out = Path(out)
    report = {mode: json.loads((out / f"eval_{mode}" / "results.json").read_text()) for mode in ("greedy", "sampled")}
    report["table"] = report["greedy"]["table"] + "\n\n" + report["sampled"]["table"]
    report["times"] = times = json.loads((out / "stage_times.json").read_text())
    report["buckets"] = bucket_shares(out / "aepo" / "metrics.jsonl")
    report["buckets_first_half"] = bucket_shares(out / "aepo" / "metrics.jsonl", 0.5)
    report["grpo_buckets"] = bucket_shares(out / "grpo" / "metrics.jsonl")
    data_prep.write_atomically(out / "demo.json", json.dumps(report, indent=2, default=str))
    plot_curves({"ARES": out / "aepo" / "metrics.jsonl", "GRPO": out / "grpo" / "metrics.jsonl"}, out / "curves.png")
    flags = json.loads((out / "aepo" / "config.json").read_text())["flags"]
    cfg = ares.Config(**{f.name: flags[f.name] for f in dataclasses.fields(ares.Config) if f.name in flags})
    explore_page([out / "coldstart" / "final", out / "aepo" / "final"], ["cold start", "ARES"], out / "data" / "test.jsonl",
                 out / "explore.html", cfg)
    print("\n" + report["table"])
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f" (total {sum(times.values()):.0f}s)")
    return report


DEMO_MODELS = ("cold start", "ARES", "GRPO")


def demo_row(rep: dict, mode: str, model: str, level: str) -> dict:
    """A checkpoint's metrics on one level (or 'overall') in a run's demo.json; mode: greedy or sampled."""
    got = rep[mode]["metrics"]["test"][model]
    return got["overall"] if level == "overall" else got["buckets"][level]


def demo_json(run: str) -> tuple[dict, list[str]]:
    """(a run's demo.json, its levels + 'overall'), with every value demo_summary reads there checked to be a number:
    one line naming the file otherwise, not a KeyError or TypeError."""
    path = Path(run) / "demo.json"
    try:
        rep = json.loads(path.read_bytes())
        levels = [*rep["greedy"]["metrics"]["test"]["cold start"]["buckets"], "overall"]
        values = [demo_row(rep, mode, m, lv)[k] for mode in ("greedy", "sampled") for m in DEMO_MODELS for lv in levels
                  for k in ("accuracy", "mean_tokens", "sd_tokens")] + list(rep["times"].values())
        values += [rep[key].get(lv, {}).get(b, 0) or 0 for key in ("buckets", "buckets_first_half", "grpo_buckets")
                   for lv in levels[:-1] for b in ares.BUCKETS]  # a share is None where a level had no group
        bad = [v for v in values if not isinstance(v, (int, float))]
        if bad:
            raise TypeError(f"{data_prep.shown(bad[0])} where a number goes")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"--demo {run}: {path} is not the report of a finished `python ares.py` run: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:80]}") from None
    return rep, levels


def mean_sd(values: list[float], scale: float = 1.0, signed: bool = False) -> str:
    """'mean ± sd' over the seeds (the sample sd); one seed has no sd: 'mean ± n/a', not the '± 0.0' of seeds that agree."""
    m = statistics.mean(values) * scale
    sd = f"{statistics.stdev(values) * scale:.1f}" if len(values) > 1 else "n/a"
    return f"{m:+.1f} ± {sd}" if signed else f"{m:.1f} ± {sd}"


def demo_summary(runs: list[str]) -> str:
    """The README's opening table from `python ares.py --seed S --out runs/seedS` runs (their demo.json): per level and
    overall, mean ± sd over the runs of accuracy (%) and mean response tokens of the cold start, ARES and GRPO, the
    per-seed changes ARES - cold start and ARES - GRPO; then each seed's accuracy per level, the length spread (sd of
    response tokens) per level, the trace styles, and the share of each level's groups in each online bucket."""
    for r in runs:
        missing = next((f for f in ("demo.json", "data/test.jsonl", "eval_sampled/responses.jsonl")
                        if not (Path(r) / f).is_file()), None)
        if missing:
            raise SystemExit(f"--demo {r}: no {missing} in it; give the --out folder of a finished `python ares.py` run")
    reports, levels = [], None
    for r in runs:  # the levels are the first run's: every run must have the same ones
        rep, own = demo_json(r)
        if levels and own != levels:  # a run of another demo task (--levels ...): the table would mix two tasks
            raise SystemExit(f"--demo {r}: its levels ({', '.join(own[:-1])}) are not those of {runs[0]} "
                             f"({', '.join(levels[:-1])}): the table averages runs of one demo task")
        levels = own
        reports.append(rep)
    lines = []
    for mode, title in (("greedy", "greedy"), ("sampled", "T = 1, mean@4")):
        seeds = f"{len(runs)} seed{'s' * (len(runs) != 1)}"
        lines += [f"\n{title}, {seeds}, mean ± sd | accuracy % (cold start / ARES / GRPO) | ARES - cold | "
                  "ARES - GRPO | tokens (cold start / ARES / GRPO) | tokens: ARES vs cold | ARES vs GRPO",
                  "|".join(["---"] * 7)]
        for lv in levels:
            get = lambda model, key: [demo_row(rep, mode, model, lv)[key] for rep in reports]  # noqa: E731
            acc = {m: get(m, "accuracy") for m in ("cold start", "ARES", "GRPO")}
            tok = {m: get(m, "mean_tokens") for m in ("cold start", "ARES", "GRPO")}
            rel = lambda a, b: [x / y - 1 for x, y in zip(tok[a], tok[b])]  # noqa: E731
            diff = lambda a, b: [x - y for x, y in zip(acc[a], acc[b])]  # noqa: E731
            lines.append(" | ".join([lv, " / ".join(mean_sd(acc[m], 100) for m in acc),
                                     mean_sd(diff("ARES", "cold start"), 100, True), mean_sd(diff("ARES", "GRPO"), 100, True),
                                     " / ".join(mean_sd(tok[m]) for m in tok), mean_sd(rel("ARES", "cold start"), 100, True) + "%",
                                     mean_sd(rel("ARES", "GRPO"), 100, True) + "%"]))
    lines += ["\nper seed (greedy overall accuracy %: cold start -> ARES / GRPO; stage times)"]
    for run, rep in zip(runs, reports):
        acc = [demo_row(rep, "greedy", m, "overall")["accuracy"] * 100 for m in ("cold start", "ARES", "GRPO")]
        lines.append(f"{run}: {acc[0]:.1f} -> {acc[1]:.1f} / {acc[2]:.1f}; " + ", ".join(
            f"{k} {v:.0f}s" for k, v in rep["times"].items()) + f" (total {sum(rep['times'].values()):.0f}s)")
    for what, key, scale in (("accuracy %", "accuracy", 100), ("response tokens", "mean_tokens", 1)):
        lines += [f"\nper seed and level, {what} greedy | T = 1: cold start -> ARES (GRPO)"]
        for lv in levels[:-1]:
            for run, rep in zip(runs, reports):
                x = {mode: [scale * demo_row(rep, mode, m, lv)[key] for m in ("cold start", "ARES", "GRPO")]
                     for mode in ("greedy", "sampled")}
                lines.append(f"{lv}, {run}: " + " | ".join(f"{v[0]:.1f} -> {v[1]:.1f} ({v[2]:.1f})" for v in x.values()))
    lines += ["\nresponse tokens, sd per level (mean over seeds; near 0: one length, none for AEPO to choose from), "
              "cold start / ARES / GRPO: greedy | T = 1"]
    sd = lambda mode, m, lv: statistics.mean(demo_row(rep, mode, m, lv)["sd_tokens"] for rep in reports)  # noqa: E731
    for lv in levels:
        lines.append(f"{lv}: " + " | ".join(" / ".join(f"{sd(mode, m, lv):.1f}" for m in ("cold start", "ARES", "GRPO"))
                                           for mode in ("greedy", "sampled")))
    lines += style_lines(runs, levels[:-1])
    for key, what in (("buckets", "ARES, all AEPO steps"), ("buckets_first_half", "ARES, first half of the steps"),
                      ("grpo_buckets", "GRPO, all steps")):
        lines += [f"\ngroups per online bucket ({what}), mean share over seeds: easy / medium / hard"]
        for lv in levels[:-1]:  # a level with no group in that part of a run has no shares (None): n/a
            shares = {b: [rep[key].get(lv, {}).get(b) for rep in reports] for b in ares.BUCKETS}  # per seed
            pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            means = [statistics.mean(seen) if seen else None for seen in
                     ([v for v in shares[b] if v is not None] for b in ares.BUCKETS)]
            lines.append(f"{lv}: " + " / ".join(map(pct, means))
                         + f" (hard, per seed: {', '.join(map(pct, shares['hard']))})")
    return "\n".join(lines)


def style_lines(runs: list[str], levels: list[str]) -> list[str]:
    """Per level and checkpoint, at T = 1: the share of responses in each trace style (data_prep.demo_style) and the
    accuracy of those responses, mean over the runs: what the policy chose to write, and what it was worth."""
    names = ("cold start", "ARES", "GRPO")
    count = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # (run, level, model) -> style -> [responses, right]
    for run in runs:
        level_of = {r["id"]: r["difficulty"] for r in map(json.loads, open(Path(run) / "data" / "test.jsonl"))}
        for r in read_cache(Path(run) / "eval_sampled" / "responses.jsonl").values():  # once each, its last verdict
            c = count[run, level_of[r["id"]], r["model"]][data_prep.demo_style(r["response"])]
            c[0], c[1] = c[0] + 1, c[1] + bool(r["correct"])
    lines = ["\ntrace styles at T = 1: share of responses (mean over seeds) and accuracy within the style (pooled), "
             "per checkpoint (cold start / ARES / GRPO)", "level | " + " | ".join(data_prep.STYLES), "---|---|---|---"]
    for lv in levels:
        cells = []
        for style in data_prep.STYLES:
            parts = []
            for m in names:
                got = [count[run, lv, m][style] for run in runs]
                share = statistics.mean(g[0] / max(1, sum(x[0] for x in count[run, lv, m].values()))
                                        for g, run in zip(got, runs))
                n, right = sum(g[0] for g in got), sum(g[1] for g in got)
                parts.append(f"{100 * share:.0f}% ({100 * right / n:.0f}%)" if n else "0%")
            cells.append(" / ".join(parts))
        lines.append(" | ".join([lv, *cells]))
    return lines



# ----------------------------------------------------------------------------------------------------------
# Entry point.


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    with ares.one_line_per_node():  # under torchrun a flag's or a file's error is printed once a node, not once a rank
        if argv[:1] == ["passrate"]:  # eval.py passrate --data ... --model ... --out rates.jsonl
            args = passrate_parser().parse_args(argv[1:])
            data_prep.expand_home(vars(args), ("out", "model", "data"))  # --out=~/x: where check_records_out looks
            return ctrl_c_line(run_passrate, args, f"{args.out} is as it was: passrate writes it once every problem is "
                                                   "sampled; the same command starts it again")
        if argv[:1] == ["curves"]:  # eval.py curves <out>/metrics.jsonl: <out>/curves.png
            return ctrl_c_line(run_curves, curves_parser().parse_args(argv[1:]), "the same command draws the curves")
        if argv[:1] == ["demo-report"]:  # eval.py demo-report <out of a python ares.py run>
            return ctrl_c_line(run_demo_report, demo_report_parser().parse_args(argv[1:]),
                               "the same command writes the report")
        cfg = parse_config(argv)  # Ctrl-C: what was generated is in the cache, appended round by round
        cache = Path(cfg.out) / "responses.jsonl"
        return ctrl_c_line(evaluate_and_report, cfg, f"the responses generated so far are in {cache}; the same "
                                                     "command goes on from them")


def ctrl_c_line(fn, args, what_now: str):
    """ares.run_command(fn, args), where a Ctrl-C ends the command with one line on rank 0 (every rank gets the
    signal under torchrun) and exit code 130, as in ares.py, instead of a traceback (passrate's was one, exit -2)."""
    try:
        return ares.run_command(fn, args)
    except KeyboardInterrupt:
        ares.close_progress_bars()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\ninterrupted (Ctrl-C): {what_now}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # as ares.py: the shell's code for a Ctrl-C


if __name__ == "__main__":
    try:
        main()
    finally:  # as ares.py: a Ctrl-C while Python shuts down would end it with exit -2 and no word
        signal.signal(signal.SIGINT, signal.SIG_IGN)
