"""Data and verdicts for ARES: records, the grader, AdaCS curation, and the offline demo task.

The bottom of the import graph (data_prep.py <- ares.py <- eval.py, bench.py): it imports no local file and knows
nothing of the trainer. Its functions take plain arguments: records in, records, prompts or verdicts out.

The data pipeline of a real run (paper §3.1), ending in the two stages of ares.py:

    python data_prep.py convert --preset geometry3k --out data/geo3k.jsonl          # any dataset -> records
    torchrun --nproc_per_node=8 eval.py passrate --data data/geo3k.jsonl \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --k 8 --keep-responses --out data/pool.jsonl  # p(x) + candidate traces
    python data_prep.py adacs --data data/pool.jsonl --out data/sft.jsonl            # length-matched traces
    python data_prep.py adacs --data data/teacher.jsonl --pass-rates data/rates.jsonl --model M --out data/sft.jsonl
                                                      # the paper's setting: teacher traces, pass rates from M
    torchrun --nproc_per_node=8 ares.py --stage coldstart --model Qwen/Qwen2.5-VL-7B-Instruct --data data/sft.jsonl
    python data_prep.py demo --out data/demo          # the procedurally generated multimodal demo task (offline)
    python data_prep.py SUBCOMMAND --help             # every option; `convert --help` lists the presets

  convert   a hub dataset, JSONL, Parquet or saved dataset folder -> records, by a column mapping or a preset.
            Answers are normalised (a \\boxed{} unwrapped, GSM8K's "#### N" cut), image placeholders ("<image>",
            "<image1>") are stripped from questions, multiple-choice options are rendered into the question as
            "\\nChoices:\\n(A) ...\\n(B) ..." and the answer becomes the option's letter. Images are written as PNGs.
  adacs     AdaCS on a pool of candidate traces: per source L(0), L(1); L_target(p) = (1-p) L(0) + p L(1);
            per problem the correct trace nearest its target; then equal counts per pass-rate bracket.
  demo      coloured bars whose lengths are numbers: read one (easy), add two (medium), multiply two sums (hard);
            three teacher traces per problem (terse, steps, steps + re-check) for AdaCS to choose from.
Pass rates (K graded samples of a model per problem) need the sampler: `eval.py passrate` computes them.

Choices made here, where the paper and the released code are silent:
  - Pass-rate brackets are round(p * K), K = --k (default 8: the 9 brackets 0, 1/8, ..., 1). Every pass rate read
    must be a multiple of 1/K (check_pass_rates): K is the flag's, not guessed from the data. L_target takes p as
    its bracket's c/K, exactly (fractions): a rate written 0.38 is 3/8, and a tie in length stays a tie.
  - L(0) (L(1)) is the median length of ALL candidate traces (right or wrong) of the source's problems with
    p = 0 (p = 1). A source with no p = 0 (p = 1) problem takes it from its lowest (highest) bracket present:
    the nearest difficulty it has. With one bracket only, both anchors are its median and the target is flat.
  - Ties for the nearest trace go to the shorter trace, then to the first in the pool.
  - Without --per-bracket the count is the largest balanced one: the size of the smallest non-empty bracket
    (brackets with no correct trace, typically p = 0 when the pool's traces come from the graded model, are
    empty and do not force the count to zero). Over-full brackets are subsampled with --seed.
  - A problem without a pass_rate takes the fraction of its traces that are correct.
  - An empty response (passrate's sample that ended at once) is a wrong trace of 0 tokens: it counts toward L(0) and
    L(1) like every other sample behind p, and is never chosen. A missing or non-text response stops the pool.
  - A trace's length is its sampled tokens without the end-of-turn token (passrate), or the tokenizer's
    count of its text (adacs --model, for pools without a `length`).

The demo task: four bars (red, green, blue, yellow) in a column, in random order, each as long as the number it
stands for (0-4). Three levels ask for one length (easy), the sum of two (medium), or the product of two sums
(hard: (a + b) * (c + d)). Each problem comes with three correct teacher traces of growing length: terse
("<think>7.</think> The answer is \\boxed{7}."), steps (every length read, then the arithmetic in one line:
"Compute: (3 + 2) * (4 + 1) = 25.") and recheck (steps, then after a reasoning word the arithmetic again, one
operation at a time: "Wait, check again: 3 + 2 = 5, 4 + 1 = 5, 5 * 5 = 25."; on an easy problem the length again).
For the tiny model the re-check is worth nothing on an easy problem and little on a medium one (one operation), but
on a hard one the worked-out operations are right more often than the one line (README, "Why this task"): the
right length depends on the difficulty, and that is what AdaCS and AEPO adapt.
Each 28 x 28 pixel cell is exactly one merged vision token of Qwen2.5-VL (14-pixel patches, 2 x 2 merge): its top half is the bar's colour, its bottom half a black bar 7 px per unit, so
colour and length sit in separate patches and every bar's colour is visible, even at length 0. Reading a length is
reading one token found by its colour: the tiny model learns it on a CPU in minutes. (Two earlier versions were
seed-dependent: counting squares in a 4 x 4 grid, and squares whose *size* was the number, where a small square
left almost no colour to find it by, and size 0 left none; the frozen random vision tower then gave nearly the same
features to a red and a green square of size 1, cosine 0.93-1.0, against at most 0.83 for any two distinct cells
here, and reading was learned at a step the seed decided.)
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import errno
import functools
import io
import json
import math
import numbers
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import unicodedata
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:  # torch is imported by the functions that make tensors: a grader process starts without it
    import torch



# ----------------------------------------------------------------------------------------------------------
# Records (README: data format): what every stage of ares.py reads, checked before any model loads, and
# the prompt a record becomes.


FORMAT_PROMPT = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
                 "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
                 "MUST BE put in \\boxed{}.")  # the authors' prompt suffix (README: paper settings)


class DataError(ValueError):
    """A bad input record: the message names the file, the record and the problem."""


def json_rows(path):
    """Rows of a JSON-lines file, or of a file holding one JSON list; a bad line names its number."""
    with open(path, "rb") as fh:
        if fh.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):  # a list, after a byte-order mark too
            fh.seek(0)
            yield from _json(fh.read(), path, "the file")
            return
        fh.seek(0)
        for n, line in enumerate(fh, 1):
            if line.strip():
                yield _json(line, path, f"line {n}")


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # a JSON escape of half a UTF-16 pair (an emoji is two)


def _json(raw: bytes, path, where: str):
    """Bytes -> JSON value; non-UTF-8 bytes and bad JSON raise DataError naming the file and line, and so does an escape
    of a lone surrogate ("\\ud800"): it is no character, and the tokenizer and Parquet stop on it with a traceback."""
    try:
        value = json.loads(raw.decode("utf-8-sig"))
        if _SURROGATE.search(raw):  # a pair of escapes reads as one character; one alone stays a surrogate
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        raise DataError(f"{path}: {where}: not UTF-8 text (the escape \\u{ord(e.object[e.start]):04x}: half of a "
                        "UTF-16 surrogate pair, no character)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {where}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {where}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # an integer of over 4,300 digits: Python refuses to read it
        raise DataError(f"{path}: {where}: not valid JSON ({str(e).split(';')[0]})") from None


def record_rows(path: str, split: str):
    p = Path(path)
    if p.suffix in (".jsonl", ".json") and p.is_file():
        yield from json_rows(p)
        return
    import datasets
    import pyarrow.parquet as pq

    parquet = p.suffix == ".parquet" and p.is_file()
    saved = p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if p.exists() and not (parquet or saved):
        raise DataError(f"{path}: not a .jsonl, .json, .parquet or saved dataset folder")
    try:
        if parquet and pq.read_metadata(p).num_rows == 0:  # datasets' reader fails on it with a traceback
            return  # no rows: the caller says "no records", naming the file
        ds = (datasets.Dataset.from_parquet(str(p)) if parquet else datasets.load_from_disk(str(p)) if saved
              else datasets.load_dataset(path, split=split))
    except (OSError, ValueError, ImportError) as e:  # pyarrow's and datasets' errors derive from these
        first_line = str(e).split("\n")[0][:200]
        raise DataError(f"{path}: cannot be read as a dataset: {type(e).__name__}: {first_line}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)}): name one with --split "
                            "(ares.py's --eval-data reads 'test')")
        ds = ds[split]
    yield from encoded_images(ds)  # load_records decodes each once to check it


def encoded_images(ds):
    """A dataset whose Image columns give their encoded bytes ({'bytes', 'path'}) instead of PIL images: a corrupt
    image is then reported by the record checks, naming the record, not raised by datasets while iterating."""
    import datasets

    for name, feature in ds.features.items():
        inner = getattr(feature, "feature", feature)
        if isinstance(inner, datasets.Image):
            image = datasets.Image(decode=False)
            ds = ds.cast_column(name, image if inner is feature else datasets.Sequence(image) if isinstance(
                feature, datasets.Sequence) else [image])
    return ds


def image_source(img, base: Path):
    """What a record keeps of an image: an absolute path, encoded bytes, or a PIL image (decoded on use, so a
    large dataset is not held decoded in memory)."""
    if isinstance(img, dict):
        img = img.get("bytes") or img.get("path")
    if isinstance(img, str) and not Path(img).is_absolute():
        img = str(base / img)
    if img is None or not isinstance(img, (str, bytes, bytearray)) and not hasattr(img, "convert"):
        raise TypeError(f"unsupported image type {type(img).__name__}")
    return img


def open_image(img, base: Path | None = None):
    """Path (relative to `base`), bytes, {'bytes'|'path'} dict or PIL image -> RGB PIL image."""
    from PIL import Image

    if isinstance(img, dict) or isinstance(img, str) and base is not None:
        img = image_source(img, base or Path("."))
    if isinstance(img, (bytes, bytearray)):
        return on_white(Image.open(io.BytesIO(img)))
    if isinstance(img, str):
        with Image.open(img) as im:
            return on_white(im)
    return on_white(img)


def on_white(im):
    """PIL image -> RGB, a transparent one laid on white first, as Qwen-VL's own processor does (convert_to_rgb): a
    plain .convert("RGB") drops the alpha and keeps the hidden colour, black in most files, so a black drawing on a
    transparent background (common in MathVista's PNGs) became an all-black image."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _decoded_size(img) -> tuple[int, int]:
    im = _check_shape(open_image(img))  # a full decode: a truncated file fails here, not mid-training
    return im.height, im.width


def data_folder(path) -> Path:
    """The folder a data file's relative image paths start from (README: data format): the file's folder as its path
    gives it, so that a symbolic link to the file reads them next to the link, not next to its target (as a Hugging
    Face cache snapshot holds its files); a dataset folder itself. Training, eval.py, passrate, convert and adacs all
    read through it."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_records(path: str, split: str = "train", need_response: bool = False, errors: list | None = None) -> list[dict]:
    """Read and validate every record of a file or dataset (README: data format); see check_records."""
    return check_records(record_rows(path, split), str(path), data_folder(path), Path(path).stem, need_response, errors)


def read_records(data: str, split: str | None = None, preset: str = "", need_response: bool = False) -> list[dict]:
    """Checked records of ares.py's --data or --eval-data: our own field names (load_records; `split` None: train),
    or a preset's columns (load_source; a preset's name alone reads its hub dataset; `split` None: the preset's)."""
    if not preset and data not in PRESETS:
        return load_records(data, split or "train", need_response)
    rows = load_source(data, preset=preset or None, split=split)
    return check_records(rows, f"{data} (preset {preset or data})", Path.cwd(), preset or data, need_response)


def check_records(rows, where: str, base: Path, default_source: str, need_response: bool = False,
                  errors: list | None = None) -> list[dict]:
    """Validate raw rows into records (README: data format; each problem: `record_problem`), every image decoded once (in
    parallel) so that a broken one fails now, not hours into training. A bad record raises DataError naming
    `where`, the record and the problem; with an `errors` list it is appended there as {id, error, row} and
    skipped instead (evaluation reports it and goes on)."""
    from concurrent.futures import ThreadPoolExecutor

    records, seen = [], set()

    def fail(rid, row, problem):
        if errors is None:
            raise DataError(f"{where}: record {rid}: {problem}")
        errors.append(dict(id=rid, error=problem, row=row))

    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            fail(f"#{n}", row, f"is {json.dumps(row, default=repr)[:60]}, not an object with id, question, answer")
            continue
        rid = str(row["id"]).strip() if isinstance(row.get("id"), (str, int)) and not isinstance(row["id"], bool) else ""
        rid = rid or f"#{n}"  # a missing or empty id: named by its row
        images = row.get("images")  # none: null, "" or []; false or 0 are no image and stop below, as in convert
        images = [] if images is None or images in ("", []) else list(images) if isinstance(images, (list, tuple)) \
            else [images]
        try:
            images = [image_source(img, base) for img in images]
        except TypeError as e:
            fail(rid, row, f"field 'images': {e} (give a path, encoded bytes or a {{'bytes' | 'path'}} object)")
            continue
        problem = record_problem(row, need_response)
        if problem:
            fail(rid, row, problem)
        elif rid in seen:
            fail(f"{rid} (row {n})", row, "duplicate id")
        else:
            seen.add(rid)
            question, answer = row["question"], str(row["answer"])
            if row.get("choices"):  # record_problem checked them
                question, answer, choices = with_choices(question, answer, row["choices"])
                row = dict(row, choices=choices)
            records.append(dict(row, id=rid, question=question, answer=answer, images=images,
                                source=row.get("source") or default_source, response=row.get("response"),
                                pass_rate=row.get("pass_rate")))
    def decode(part):  # a thread per part of 64 records: a task per small image costs more than its decode
        return [[_try(_decoded_size, im) for im in r["images"]] for r in part]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL: a thread per core
        sizes = [sz for part in pool.map(decode, [records[k:k + 64] for k in range(0, len(records), 64)]) for sz in part]
    good = []
    for r, sz in zip(records, sizes):
        bad = next(((k, e) for k, e in enumerate(sz) if isinstance(e, Exception)), None)
        if bad:
            fail(r["id"], r, f"field 'images': image {bad[0]} ({str(r['images'][bad[0]])[:80]!r}) cannot be read: {bad[1]}")
        else:
            good.append(dict(r, image_sizes=sz))
    if not good and errors is None:
        raise DataError(f"{where}: no records")
    return good


CHAT_TOKEN = re.compile(r"<\|[A-Za-z][A-Za-z0-9_]{2,}\|>")  # SPECIAL_TOKENS, and Qwen/Llama/Phi's other ones


MUST_BE = dict(id="text or an integer", question="text", answer="text or a finite number", response="text",
               pass_rate="a number in [0, 1]", difficulty="text or an integer",
               choices="a list of 2 to 26 options, each text or a finite number")  # a record's field types (README: data format)


def wrong_type(field: str, v) -> bool:
    """Whether `v` (not None) is not what MUST_BE[field] says. A bool is not a number (str() would make it "True"), and
    an int of any size is finite (math.isfinite overflows on 10**400)."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if field == "pass_rate":
        return not (number and 0 <= v <= 1)  # NaN too
    if isinstance(v, str):
        return False
    if field == "answer":
        return not (number and (isinstance(v, int) or math.isfinite(v)))
    return not (number and isinstance(v, int) and field in ("id", "difficulty"))


def shown(v) -> str:
    return json.dumps(v, default=repr)[:60]


def record_problem(row: dict, need_response: bool) -> str | None:
    """What is wrong with a record's fields, or None: id text or an integer; question and response text;
    answer text or a finite number; none of them empty or holding a chat-template token (the model would read
    '<|im_end|>' as the end of its turn, '<|image_pad|>' as an image); pass_rate a number in [0, 1]; difficulty, when
    present, text or an integer level (a list would become log keys such as level_['hard']_acc)."""
    for k in ("id", "question", "answer", "response"):
        v = row.get(k)
        if v is None or isinstance(v, str) and not v.strip():
            if k == "response" and not need_response:  # only the cold start trains on it
                continue
            return f"missing or empty field '{k}'"
        if wrong_type(k, v):
            return f"field '{k}' must be {MUST_BE[k]}, got {shown(v)}"
        if k == "answer" and isinstance(v, str) and extract_boxed(v) == "":
            return "field 'answer' is an empty \\boxed{}"
        token = CHAT_TOKEN.search(v) if isinstance(v, str) and k != "id" else None
        if token:
            return f"field '{k}' contains the chat-template token {token.group()!r}: remove it or spell it differently"
    for k in ("pass_rate", "difficulty"):
        if row.get(k) is not None and wrong_type(k, row[k]):
            return f"field '{k}' must be {MUST_BE[k]}, got {shown(row[k])}"
    choices = row.get("choices")
    if choices not in (None, "", []):
        if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS) or any(
                wrong_type("answer", c) or not str(c).strip() or CHAT_TOKEN.search(str(c)) for c in choices):
            return f"field 'choices' must be {MUST_BE['choices']}, got {shown(choices)}"
        if with_choices(str(row["question"]), str(row["answer"]), choices)[1] is None:
            return f"field 'answer' {shown(row['answer'])} is neither an option nor an option letter of {shown(choices)}"
    return None


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported with the record by the caller
        return e


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def prompt_text(processor, record: dict) -> str:
    """The chat-formatted prompt: images first, then the question and the answer-format instruction (README: paper settings), or the
    instruction the model was trained with (processor.prompt_suffix, from its config.json; "" for none)."""
    suffix = getattr(processor, "prompt_suffix", FORMAT_PROMPT)
    text = f"{record['question']}\n{suffix}" if suffix else record["question"]
    if hasattr(processor, "image_processor"):
        content = [{"type": "image"}] * len(record["images"]) + [{"type": "text", "text": text}]
    elif record["images"]:
        raise DataError(f"record {record['id']}: has images but the model is text-only")
    else:
        content = text
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(processor, record: dict) -> dict:
    """-> {'ids': (L,) long, 'pixel_values': (patches, D) or None, 'image_grid_thw': (images, 3) or None}."""
    return encode_prompts(processor, [record])[0]


def encode_prompts(processor, records: list[dict]) -> list[dict]:
    """encode_prompt of each record, with one processor call for all the records with images (the processor's
    per-call overhead is most of a small image's cost; every image is still processed on its own, so each record
    gets what a call of its own gives)."""
    import torch

    texts = [prompt_text(processor, r) for r in records]
    out = [dict(ids=torch.tensor(tokenizer_of(processor)(t, add_special_tokens=False)["input_ids"]), pixel_values=None,
                image_grid_thw=None) if not r["images"] else None for r, t in zip(records, texts)]
    seen = [k for k, r in enumerate(records) if r["images"]]
    if seen:
        enc = processor(text=[texts[k] for k in seen], images=[open_image(im) for k in seen for im in records[k]["images"]])
        grids = torch.from_numpy(enc["image_grid_thw"])  # (images, 3): each image's patches are t * h * w rows
        pixels = torch.from_numpy(enc["pixel_values"]).split(grids.prod(-1).tolist())
        first = 0
        for j, k in enumerate(seen):
            n = len(records[k]["images"])
            out[k] = dict(ids=torch.tensor(enc["input_ids"][j]), pixel_values=torch.cat(pixels[first:first + n]),
                          image_grid_thw=grids[first:first + n])
            first += n
    return out


def prompt_length(processor, record: dict) -> int:
    """Token count of the encoded prompt, from the image sizes alone (no pixel processing)."""
    tok = tokenizer_of(processor)
    n = len(tok(prompt_text(processor, record), add_special_tokens=False)["input_ids"])
    if record["images"]:
        sizes = record.get("image_sizes") or [_decoded_size(im) for im in record["images"]]
        known = vars(processor).setdefault("_image_tokens", {})  # per image size: a dataset has few sizes
        for size in sizes:
            if tuple(size) not in known:
                known[tuple(size)] = processor._get_num_multimodal_tokens(image_sizes=[size])["num_image_tokens"][0]
        n += sum(known[tuple(size)] - 1 for size in sizes)
    return n


def check_prompts(processor, records: list[dict], max_len: int) -> tuple[list[dict], list[dict]]:
    """Split records into usable ones and failures ({id, error}): too long for --max-prompt-len, or not
    encodable by this model (e.g. images for a text-only model)."""
    usable, failures = [], []
    for r in records:
        try:
            n = prompt_length(processor, r)
        except Exception as e:  # noqa: BLE001 - reported per record
            failures.append(dict(id=r["id"], error=f"prompt cannot be encoded: {e}"))
            continue
        if n > max_len:
            failures.append(dict(id=r["id"], error=f"prompt has {n} tokens, more than --max-prompt-len {max_len}"))
        else:
            usable.append(r)
    return usable, failures



# ----------------------------------------------------------------------------------------------------------
# Grading: the last \boxed{...} against the ground truth, with math-verify for mathematical equivalence and a
# normalised string comparison for everything else (multiple-choice letters, words); or the user's --reward-fn.


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} (or \\fbox{...}), nested braces handled; None if there is none.
    extract_boxed("so \\boxed{1} no, \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


_CHOICE = re.compile(r"^(?:option\s+)?\(?([A-Za-z])\)?[.:]?$", re.I)  # B, (B), b., Option B
_CHOICE_SAID = re.compile(r"^(?:option\s+)?(?:\(([A-Za-z])\)|([A-Za-z])(?:[:)]|\.(?=\s)))\s*(\S.*)$", re.I | re.S)  # B. 8/11
_ANOTHER_CHOICE = re.compile(r"(?:^|[\s,;/&])(?:\([A-Za-z]\)|[A-Za-z][.:)](?=\s|$))|^[A-Za-z]$")  # "(A) and (C)", "A:B"


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathbf|mathrm|mbox)\{([^{}]*)\}")


def _normalise(s: str) -> str:
    s = _TEXT_WRAP.sub(r"\1", s.strip().strip("$"))
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def _choice_letter(s: str, said: bool = False) -> str | None:
    """The option letter `s` is ("(B)", "b.", "\\text{B}", "Option B"), or, with `said`, the letter it starts with
    before the option's text ("B. 8/11", "(B) No", "B:45^\\circ": how MathVerse shows its options)."""
    s = _TEXT_WRAP.sub(r"\1", s.strip().strip("$")).strip()
    m = _CHOICE.match(s)
    if m:
        return m.group(1).upper()
    m = _CHOICE_SAID.match(s) if said else None
    if m is None or _ANOTHER_CHOICE.search(m.group(3)):  # "(A) and (C)", "A) x B) y": two answers, none of them
        return None
    return (m.group(1) or m.group(2)).upper()


class GraderTimeout(BaseException):  # not an Exception: math-verify's and sympy's `except Exception` let it pass
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise GraderTimeout in the body once `seconds` have passed: a SIGALRM timer, so on the main thread only
    (elsewhere the body runs unbounded) and only where Python code runs (not inside a C call that ignores signals).
    An alarm due just as the body ends raises here too: the body did take the whole time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_):
        raise GraderTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _math_equal(pred: str, answer: str, timeout: float, digits: int | None = None) -> bool:
    """math-verify's equivalence, stopped after `timeout` seconds (time_limit: main thread only); with `digits` (the
    answer is a decimal rounded to them: _places), also a number within half a unit of its last place (\\sqrt{6}
    for 2.4)."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the timer is ours
    try:
        with time_limit(timeout):
            gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
            guess = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
            if gold and guess and verify(gold, guess, timeout_seconds=None):
                return True
            return digits is not None and bool(guess) and _rounds_to(guess[0], answer, digits)
    except (GraderTimeout, Exception):  # noqa: BLE001 - a grader must not crash training on odd model output
        return False


def _rounds_to(expr, answer: str, digits: int) -> bool:
    """Is the sympy number `expr` (or the right side of "x = ...") the decimal `answer` at `digits` decimals?"""
    import sympy

    expr = expr.rhs if isinstance(expr, sympy.Eq) else expr
    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return False
    value = complex(expr.evalf(digits + 15))
    return value.imag == 0 and abs(value.real - float(_nearest(answer, digits))) * 2 * 10 ** digits <= 1 + 1e-9


def _nearest(answer: str, digits: int) -> Fraction:
    return round(Fraction(_normalise(answer)), digits)


_WIDE = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # fullwidth ASCII -> ASCII (as NFKC maps them)


_INTEGER = re.compile(r"[+-]?\d+")


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")


_UNICODE_MATH = {"°": "^\\circ", "√": "\\sqrt", "π": "\\pi ", "∞": "\\infty", "−": "-", "≤": "\\le ", "≥": "\\ge ",
                 "×": "\\times ", "·": "\\cdot ", "÷": "/", "。": ".", "⁄": "/"}  # what models write for LaTeX they mean


_VULGAR = {c: "\\frac{%s}{%s}" % tuple(unicodedata.normalize("NFKC", c).split("⁄")) for c in "¼½¾⅐⅑⅒⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞↉"}


_MIXED = re.compile(r"(\d+) ?([%s])" % "".join(_VULGAR))  # "1½", "2 ¾": a whole number and a fraction


_UNIT_WORD = (r"(?:(?:square|sq\.?|cubic)\s*)?(?:units?|(?:milli|centi|kilo)?(?:meters?|metres?)|mm|cm|dm|km|inch(?:es)?|"
              r"ft|feet|foot|yd|yards?|mi|miles?|degrees?|radians?)")  # several letters: never a variable's name


_UNIT = re.compile(  # a unit after a number (or "}", ")", "\\pi"): "5 cm", "12 \\text{ cm}^2", "6 units^2", "12 in", "24 m²"
    rf"(?:(?<=[\d}}).])|(?<=\\pi))(?:\s|\\[,;:! ]|~)*"
    rf"(?:\\(?:text|mathrm|textrm|mbox)\{{\s*(?:{_UNIT_WORD}|m|in)\s*(?:\^\{{?[23]\}}?)?\s*\}}|{_UNIT_WORD}|\s(?:m|in))"
    r"(?:\^?\{?[23]\}?|[²³])?\s*$")  # "m" and "in" only after a space or in \text{}: "5m" may be 5 times m


def _without_unit(s: str) -> str:
    """The answer without a unit written after its number: benchmarks' answers are bare numbers, and math-verify
    reads "5 cm^2" as 5 c m^2 and "12 in" as 12 i n. Units are dropped, not compared ("5 m" = "5 cm")."""
    return _UNIT.sub("", s) if len(s) <= 300 else s


_GLUED_LETTER = re.compile(r"(?<=\d)([cdghlmost])(?![A-Za-z])")  # the letters math-verify drops after a number


def _factor_kept(s: str) -> str:
    """A single letter written right after a number kept as a factor for sympy ("5m" -> "5{m}"): math-verify reads
    c, d, g, h, l, m, o, s and t there as units and drops them, so "5m" was 5 (and "4t" the answer 4), where a single
    letter is a unit only after a space or in \\text{} (_UNIT)."""
    return _GLUED_LETTER.sub(r"{\1}", s)


def _ascii_math(s: str) -> str:
    """Fullwidth forms ('１２', '（Ａ）'), every Unicode decimal digit ('٣', '३') and the math signs models write in
    Unicode ('30°', '2√3', 'π', '−5') -> ASCII and LaTeX, so they grade equal to the LaTeX answers ('30^\\circ',
    '2\\sqrt{3}'), and vulgar fractions ('½', '1½') -> fractions. (Full NFKC also turns '10²' into '102', and leaves
    Arabic-Indic digits alone.)"""
    if s.isascii():
        return s
    s = s.translate(_WIDE)
    s = re.sub(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\(([^()]*)\))", lambda m: f"\\sqrt{{{m.group(2) or m.group(1)}}}", s)  # √3, √(x+1)
    s = _MIXED.sub(lambda m: f"({m.group(1)}+{_VULGAR[m.group(2)]})", s)  # a sum: never read as 1 * 1/2
    s = "".join(_UNICODE_MATH.get(c) or _VULGAR.get(c, c) for c in s)
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in s)


GRADER_VERSION = 4  # raised whenever a verdict can change: eval.py grades its cached responses again under a new one


@dataclasses.dataclass(frozen=True)
class Gold:
    """What a response is graded against, when the record holds more than its answer: the options of a
    multiple-choice record (its answer is their letter; the text of the right option is right too), and the
    `precision` of a decimal answer (MathVista's, geometry3k's: a number that rounds to the answer at it is right).
    The grader's functions take a Gold or a plain answer."""
    answer: str
    choices: tuple = ()
    precision: int | None = None


def gold_of(record: dict) -> Gold:
    """A record's Gold: its answer, its `choices` (else, for a letter answer, the options its question lists under a
    "Choices:" line: MathVerse's) and its `precision` (an integer number of decimals, 0-15)."""
    digits = record.get("precision")
    ok = isinstance(digits, (int, float)) and not isinstance(digits, bool) and digits == digits and 0 <= digits <= 15 \
        and digits == int(digits)
    choices = record.get("choices") or (listed_options(str(record.get("question", "")))
                                        if _choice_letter(_ascii_math(str(record["answer"]))) else ())
    return Gold(str(record["answer"]), tuple(str(c) for c in choices), int(digits) if ok else None)


_OPTION_LINE = re.compile(r"\s*(?:\(([A-Z])\)|([A-Z])\s*[:.：)])\s*(\S.*?)\s*")  # "A:30°", "(A) 30°", "A. 30°"


def listed_options(question: str) -> tuple[str, ...]:
    """The options a question lists one per line after its last "Choices:" line, lettered A, B, ... in order
    (MathVerse's "Choices:\\nA:30°\\nB:45°"); () unless there are two or more."""
    head = list(re.finditer(r"(?im)^\s*choices?\s*[:：]\s*$", question))
    options = []
    for line in question[head[-1].end():].lstrip("\r\n").splitlines() if head else ():
        m = _OPTION_LINE.fullmatch(line)
        if not m or (m.group(1) or m.group(2)) != LETTERS[len(options)]:
            break
        options.append(m.group(3))
    return tuple(options) if len(options) >= 2 else ()


def _gold(answer) -> Gold:
    return answer if isinstance(answer, Gold) else Gold(str(answer))


def quick_verdict(pred: str | None, answer: str | Gold) -> bool | None:
    """The cheap checks of is_correct: choice letters (and the options' texts), equal normalised strings, integers,
    decimals at the answer's precision; None = needs sympy (against `math_target(answer)`)."""
    gold = _gold(answer)
    if pred is None or not str(pred).strip():
        return False
    pred, answer = _ascii_math(str(pred)), _ascii_math(gold.answer)
    gold_letter = _choice_letter(answer)
    if gold_letter:  # multiple choice: (B), B., b, \text{B}, "B. 8/11" are all B
        pred_letter, option = _choice_letter(pred, said=True), right_option(gold)
        if pred_letter or option is None:
            return pred_letter == gold_letter
        texts = [_normalise(_ascii_math(c)) for c in gold.choices]  # no letter: the option's text, "8/11" or "No"
        if _normalise(pred) in texts:
            return LETTERS[texts.index(_normalise(pred))] == gold_letter
        answer = _ascii_math(option)  # "\frac{8}{11}": equal to the option's value?
    pred, answer = _without_unit(pred), _without_unit(answer)
    p, a = _normalise(pred), _normalise(answer)
    if p == a:
        return True
    if len(pred) > 300 or len(answer) > 300:  # long inputs skip sympy
        return False
    if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(a):
        return int(p) == int(a)
    digits = None if gold_letter else _places(gold, a)
    if digits is not None and _DECIMAL.fullmatch(p):  # "15.59" for 15.6: half a unit of its last place away at most
        return abs(Fraction(p) - _nearest(a, digits)) * 2 * 10 ** digits <= 1
    return None


def _places(gold: Gold, answer: str) -> int | None:
    """The decimals a decimal answer is rounded to: the record's `precision` (MathVista's; geometry3k's decimal
    answers, its options' rounded values, get theirs from convert: `precision_from_answer`). None: compared exactly,
    as a decimal answer without one is ("0.51" is not 0.5: most data sets' decimals are exact)."""
    return gold.precision if gold.precision is not None and _DECIMAL.fullmatch(_normalise(answer)) else None


def right_option(gold: Gold) -> str | None:
    """The text of the option a multiple-choice answer's letter names, when the record lists its options."""
    letter = _choice_letter(_ascii_math(gold.answer))
    return gold.choices[LETTERS.index(letter)] if letter and letter in LETTERS[:len(gold.choices)] else None


def math_target(pred: str, answer: str | Gold) -> tuple[str, str, int | None]:
    """What sympy compares when quick_verdict cannot tell: the prediction and the answer, or, for a multiple-choice
    answer with options, the text of the right option (both without a unit after the number), and the decimals a
    decimal answer is rounded to (_places; None for an option, whose value must be met exactly)."""
    gold = _gold(answer)
    option = right_option(gold)
    target = _without_unit(_ascii_math(option or gold.answer))
    places = None if option else _places(gold, target)
    return _factor_kept(_without_unit(_ascii_math(str(pred)))), _factor_kept(target), places


def is_correct(pred: str | None, answer: str | Gold, timeout: float = 3.0) -> bool:
    """Does the extracted prediction match the answer? Never raises, and returns within about `timeout` seconds
    wherever it runs: on the main thread a timer stops sympy; on any other thread a grader process does it."""
    verdict = quick_verdict(pred, answer)
    if verdict is not None:
        return verdict
    pred, answer, digits = math_target(pred, answer)
    if threading.current_thread() is threading.main_thread():
        return _math_equal(pred, answer, timeout, digits)
    return grader_pool(1).map([(pred, answer, digits)], timeout)[0]


def grade(texts: list[str], answer: str | Gold) -> list[bool]:
    """Each response's last \\boxed{} against the answer, with the grader AEPO rewards with."""
    return [is_correct(extract_boxed(t), answer) for t in texts]


def grade_batch(preds: list, answers: list, timeout: float = 3.0, workers: int = 4) -> list[bool]:
    """is_correct of each (prediction, answer) pair: the quick checks here, the sympy ones in `workers` grader
    processes at once (workers=0: one by one in this process)."""
    if workers == 0:
        return [is_correct(p, a, timeout) for p, a in zip(preds, answers)]
    verdicts = [quick_verdict(p, a) for p, a in zip(preds, answers)]
    slow = [i for i, v in enumerate(verdicts) if v is None]
    if slow:
        jobs = [math_target(preds[i], answers[i]) for i in slow]
        for i, v in zip(slow, grader_pool(workers).map(jobs, timeout)):
            verdicts[i] = v
    return verdicts


class GraderPool:
    """Grader processes (`python -c 'data_prep.grader_worker()'`), each running _math_equal on its own main thread, so
    its timer works there. An answer still out `timeout` + 2 s after it was sent (stuck in C code that a signal
    cannot interrupt) is graded wrong and its process replaced. Thread-safe; one per process (`grader_pool`)."""

    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.procs = [self._spawn() for _ in range(n)]
        for p in self.procs:
            self._ready(p)

    @staticmethod
    def _spawn():
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                "import data_prep; data_prep.grader_worker()")
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)

    @staticmethod
    def _ready(proc):
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a grader process failed to start (exit code {proc.poll()})")

    def map(self, jobs: list[tuple], timeout: float) -> list[bool]:  # (prediction, answer[, digits])
        from multiprocessing.connection import wait

        verdicts, todo, busy = [False] * len(jobs), list(range(len(jobs)))[::-1], {}  # busy: worker -> (job, deadline)
        with self.lock:
            while todo or busy:
                for w in range(len(self.procs)):
                    if w not in busy and todo:
                        busy[w] = (todo.pop(), time.monotonic() + timeout + 2)
                        pred, answer, *digits = jobs[busy[w][0]]
                        self.procs[w].stdin.write(json.dumps([pred, answer, timeout, *digits]) + "\n")
                        self.procs[w].stdin.flush()
                pipes = {self.procs[w].stdout: w for w in busy}
                for pipe in wait(list(pipes), max(0.0, min(d for _, d in busy.values()) - time.monotonic())):
                    job, _ = busy.pop(pipes[pipe])
                    line = pipe.readline()
                    verdicts[job] = line.strip() == "true"
                    if not line:  # the process died (out of memory?): that answer is graded wrong
                        self._replace(pipes[pipe])
                for w, (job, deadline) in list(busy.items()):
                    if time.monotonic() > deadline:
                        del busy[w]
                        self._replace(w)
        return verdicts

    def _replace(self, w: int):
        self.procs[w].kill()
        self.procs[w].wait()
        self.procs[w] = self._spawn()
        self._ready(self.procs[w])


_POOL: list[GraderPool] = []


def grader_pool(n: int) -> GraderPool:
    """This process's grader processes: started on first use, grown when more are asked for."""
    if not _POOL or len(_POOL[0].procs) < n:
        for proc in _POOL[0].procs if _POOL else []:
            proc.kill()
        _POOL[:] = [GraderPool(max(n, 1))]
    return _POOL[0]


def grader_worker():
    """A grader process: one JSON [prediction, answer, timeout(, digits)] per input line -> 'true' or 'false' per
    line."""
    reply, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to report; this ends when its pipe closes
    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        pred, answer, timeout, *digits = json.loads(line)
        print(json.dumps(_math_equal(pred, answer, timeout, *digits)), file=reply, flush=True)


@functools.lru_cache
def load_reward_fn(spec: str):
    """--reward-fn 'path/to/file.py:function' or 'module:function' -> the function (one line if it is not there)."""
    import importlib
    import runpy

    where, _, name = spec.rpartition(":")
    if not where or where.endswith(".py") and not Path(where).is_file():
        raise SystemExit(f"--reward-fn {spec}: " + (f"no such file {where}" if where else "give file.py:fn or module:fn"))
    try:
        names = runpy.run_path(where) if where.endswith(".py") else vars(importlib.import_module(where))
    except Exception as e:  # noqa: BLE001 - the user's code: any error is reported in one line
        raise SystemExit(f"--reward-fn {spec}: cannot import {where}: {type(e).__name__}: {e}") from None
    if not callable(names.get(name)):
        raise SystemExit(f"--reward-fn {spec}: {where} has no function {name!r}")
    return names[name]


def score_responses(recs: list[dict], texts: list[str], group_size: int, reward_fn: str = "", timeout: float = 3.0,
                    workers: int = 4) -> torch.Tensor:
    """acc (N,) of the len(recs) * G responses `texts` (groups of G = group_size, record-major): the score in [0, 1]
    of `reward_fn` (ares.py's --reward-fn, 'file.py:fn'; reward_score), else the grader's 0/1 (the last \\boxed{}
    against the record's answer; `workers` grader processes). Either way an answer still being scored after
    `timeout` seconds scores 0."""
    import torch

    G = group_size
    if not reward_fn:
        return torch.tensor(grade_batch([extract_boxed(t) for t in texts], [gold_of(recs[i // G]) for i in range(len(texts))],
                                        timeout, workers), dtype=torch.float)
    fn = load_reward_fn(reward_fn)
    scores = [reward_score(fn, reward_fn, recs[i // G], t, timeout) for i, t in enumerate(texts)]
    late = [recs[i // G]["id"] for i, v in enumerate(scores) if v is None]
    if late:
        print(f"--reward-fn {reward_fn}: {len(late)} calls ran past --grader-timeout {timeout:g} s and scored 0 "
              f"(records {', '.join(dict.fromkeys(late))})", flush=True)
    return torch.tensor([v or 0.0 for v in scores], dtype=torch.float)


def reward_score(fn, spec: str, record: dict, response: str, timeout: float) -> float | None:
    """One call of --reward-fn `spec`: its score as a float, any real number type in [0, 1] (int, float, bool, numpy,
    a 0-d tensor); None if it ran past `timeout` seconds (time_limit). Anything else ends the run with one line
    naming the flag, the record and the value or the error; an exception first prints the traceback of the
    user's function alone, and a sys.exit() inside it is an error too, never the run's success."""
    try:
        with time_limit(timeout):
            value = fn(record, response)
    except GraderTimeout:
        return None
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit):
            raise SystemExit(f"--reward-fn {spec} called sys.exit({e.code!r}) on record {record['id']}: a reward "
                             "function must return a score in [0, 1]") from None
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the user's function down, not ours
        raise SystemExit(f"--reward-fn {spec} raised {type(e).__name__}: {e} on record {record['id']} (its traceback "
                         "is above)") from None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy scalar or 0-d array, a 0-d tensor
        value = value.item()
    if isinstance(value, numbers.Real) and 0 <= value <= 1:  # NaN fails both comparisons
        return float(value)
    raise SystemExit(f"--reward-fn {spec} returned {repr(value)[:80]} ({type(value).__name__}) for record "
                     f"{record['id']}: it must return a real number in [0, 1]")


def format_ok(text: str) -> bool:
    """The format reward: '<think> ... </think>' then a \\boxed{} answer after it."""
    m = re.fullmatch(r"\s*<think>(.+?)</think>(.*)", text, flags=re.S)
    return bool(m and m.group(1).strip() and extract_boxed(m.group(2)) is not None)



# ----------------------------------------------------------------------------------------------------------
# Metrics that count verdicts: pure functions of graded response lines (eval.py's responses.jsonl), here
# so that eval.py and ares.py's validation during AEPO (--eval-data) measure with one implementation.


BUCKETS = ("easy", "medium", "hard")  # the online difficulty buckets of paper App. G, in ares.py's order


def difficulty_of(correct, total):
    """App. G's cut-offs, the one definition: 0 (easy) if correct / total >= 2/3, 1 (medium) if >= 1/3, else 2 (hard),
    compared as 3 * correct >= 2 * total, exact in integers (G = 8: easy 6-8 right, medium 3-5, hard 0-2). Numbers or
    tensors: difficulty_of(5, 8) == 1; difficulty_of(torch.tensor([8, 2]), 8) -> tensor([0, 2])."""
    return 2 - (3 * correct >= total) * 1 - (3 * correct >= 2 * total) * 1


def pass_rate_bucket(p: float) -> str:
    """A pass rate's bucket name: pass_rate_bucket(0.75) == "easy"."""
    return BUCKETS[difficulty_of(p, 1)]


def bucket_field(rows: list[dict], by: str) -> str | None:
    """The record field the buckets come from: `by`, or for 'auto' the first of difficulty, level, pass_rate
    that any row carries; None when there is none (no per-bucket metrics)."""
    if by == "none":
        return None
    for name in (("difficulty", "level", "pass_rate") if by == "auto" else (by,)):
        if any(isinstance(r, dict) and r.get(name) is not None for r in rows):  # a failed row may be any JSON
            return name
    return None


def bucket_of(row: dict, field_name: str | None) -> str | None:
    """A record's bucket label: the field's value as text ('easy', '3'), or pass_rate bucketed (App. G)."""
    value = row.get(field_name) if field_name and isinstance(row, dict) else None  # a failed row may be any JSON
    if value is None:
        return None if field_name is None else "n/a"
    return pass_rate_bucket(value) if field_name == "pass_rate" else str(value)


def bucket_order(label: str):
    """easy, medium, hard first, then numeric levels in order, then other labels; 'n/a' last."""
    if label in BUCKETS:
        return 0, BUCKETS.index(label), ""
    try:
        return 1, float(label), ""
    except ValueError:
        return (3 if label == "n/a" else 2), 0, label


def metric_row(responses: list[dict], failed: list[dict], metric: str) -> dict:
    """Metrics of one set of records. responses: one dict per response with id, correct, tokens, truncated,
    format_ok (N per record); failed: records without any response ({id, ...}), counted as wrong.
    With a_i = (1/N) sum_j correct_ij, the accuracy of record i over its N responses (a_i = 0 for a failed one),
    and n records in all (failed ones included):
      accuracy     A  = (1/n) sum_i a_i                               (pass@1 for N = 1, mean@N otherwise)
      accuracy_se  SE = sqrt(sum_i (a_i - A)^2 / (n (n - 1)))          (standard error of the mean over problems:
                   it holds both which problems were drawn and the decoding randomness; None when n < 2)
    tokens (EOS included, as in training logs: their mean, median and spread, length_spread), truncated (hit
    --max-new-tokens without EOS) and format_ok are over all responses. Example: two records, correct [1, 1] and
    [1, 0] -> A = 0.75, SE = sqrt(0.125 / 2) = 0.25."""
    per_record: dict[str, list[float]] = {}
    for r in responses:
        per_record.setdefault(r["id"], []).append(float(r["correct"]))
    acc = [sum(v) / len(v) for v in per_record.values()] + [0.0] * len(failed)
    n, tokens = len(acc), [r["tokens"] for r in responses]
    mean = sum(acc) / n if n else None
    se = (sum((a - mean) ** 2 for a in acc) / (n * (n - 1))) ** 0.5 if n > 1 else None
    share = (lambda key: sum(bool(r[key]) for r in responses) / len(responses)) if responses else (lambda key: None)
    return dict(metric=metric, records=n, failed=len(failed), responses=len(responses), accuracy=mean,
                accuracy_se=se, mean_tokens=sum(tokens) / len(tokens) if tokens else None,
                median_tokens=float(statistics.median(tokens)) if tokens else None, **length_spread(tokens),
                truncated=share("truncated"), format_ok=share("format_ok"))


def length_spread(tokens: list[int]) -> dict:
    """How much the response lengths vary: sd_tokens (the population sd: sqrt of the mean squared distance to the
    mean) and iqr_tokens (the 75th minus the 25th percentile, each interpolated linearly between the sorted lengths
    at position q (n - 1), as numpy's default). A spread near 0 leaves AEPO no length to choose from.
    length_spread([10, 20, 30, 40]) == {'sd_tokens': 11.18..., 'iqr_tokens': 15.0}."""
    if not tokens:
        return dict(sd_tokens=None, iqr_tokens=None)
    q = statistics.quantiles(tokens, n=4, method="inclusive") if len(tokens) > 1 else [tokens[0]] * 3
    return dict(sd_tokens=statistics.pstdev(tokens), iqr_tokens=q[2] - q[0])


def summarize(responses: list[dict], failed: list[dict], samples: int = 1, field_name: str | None = None) -> dict:
    """{'overall': metric_row, 'buckets': {label: metric_row}, 'bucket_field': field_name} of one model on one
    benchmark. Each response and failure carries its record's 'bucket' label (None: no buckets)."""
    metric = "pass@1" if samples == 1 else f"mean@{samples}"
    labels = sorted({x["bucket"] for x in responses + failed if x.get("bucket") is not None}, key=bucket_order)
    buckets = {b: metric_row([r for r in responses if r.get("bucket") == b], [f for f in failed if f.get("bucket") == b],
                             metric) for b in labels}
    return dict(overall=metric_row(responses, failed, metric), buckets=buckets, bucket_field=field_name)


def response_lines(records: list[dict], out: dict, tok, samples: int = 1, reward_fn: str = "", timeout: float = 3.0,
                   workers: int = 0) -> list[dict]:
    """The graded lines of one sample() call on `records` (`samples` responses each, prompt-major): id, sample,
    answer, prediction, correct, format_ok, tokens (EOS included), truncated, response. `correct` is the grader's
    verdict, or with `reward_fn` its score, as score_responses gives them in training (same function, same limit)."""
    lengths = out["mask"].sum(1)  # (N,)
    texts = [tok.decode(out["tokens"][i, :lengths[i]], skip_special_tokens=True) for i in range(len(lengths))]
    scores = score_responses(records, texts, samples, reward_fn, timeout, workers).tolist()  # (N,)
    lines = []
    for i, text in enumerate(texts):
        rec = records[i // samples]
        lines.append(dict(id=rec["id"], sample=i % samples, answer=rec["answer"], prediction=extract_boxed(text),
                          correct=scores[i] if reward_fn else scores[i] == 1, format_ok=format_ok(text),
                          tokens=int(lengths[i]), truncated=bool(out["truncated"][i]), response=text))
    return lines



# ----------------------------------------------------------------------------------------------------------
# Files: every output is written to a temporary file, flushed, then renamed over the target.


def fsync(path: Path):
    """Flush a file or a folder's entries to disk: a rename is only atomic for data that reached the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, sync: bool = True):
    """Yield a temporary path beside `path` (<name>.tmp: writers that go by the suffix need their format named) to
    write the whole output to; then fsync it (sync=True), rename it over `path` and fsync the folder. A kill or an
    error at any moment leaves `path` as it was, never a shorter file that a later stage would read as complete. An
    OSError (a full disk) names `path`, which a write error on an open file does not."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if sync:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only folder this fails too, and would hide the first error
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    if sync:
        fsync(path.parent)


def append_lines(f, lines: list[str]):
    """Append whole lines to an open log (metrics.jsonl, eval.py's responses.jsonl) and flush them; an OSError (a full
    disk) names the file, which a write error on an open file does not. A line cut short is dropped when read."""
    try:
        f.write("".join(lines))
        f.flush()
    except OSError as e:
        e.filename = e.filename or f.name
        raise


def check_writable(flag: str, path, folder: bool = True):
    """Before a model loads or anything is written: `path` (a folder to make, or with folder=False a file's) can be made
    and written there. The nearest existing folder above it must be a folder, not a file, and writable (a read-only
    mount fails here, not after the work is done). One line naming the flag otherwise."""
    if not str(path).strip():
        raise SystemExit(f"{flag} is empty: give a {'folder' if folder else 'file'}")
    target = Path(path).expanduser().absolute()
    target = target if folder else target.parent
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: {existing} is not writable (a read-only folder or file system)")


def check_outside_runs(flag: str, path):
    """A data output (convert, adacs, demo, eval.py passrate) neither is nor lies inside a training run's folder (its
    config.json a run record: run_record_in) or one of its checkpoints (a COMPLETE record): the run's next save,
    --keep-last or --overwrite replaces a checkpoint whole, with what was written there, and records belong beside a
    run, not among its files. One line naming the flag and the folder otherwise. (eval.py's results may go into a
    subfolder of a run: ares.check_clear_of_run.)"""
    p = Path(path).expanduser().absolute()
    for q in (p, *p.parents):
        if (q / "COMPLETE").is_file():
            raise SystemExit(f"{flag} {path}: " + ("it is" if q == p else f"{q} is") + " a checkpoint of a training "
                             "run, which its next save, --keep-last or --overwrite replaces whole: give a folder outside it")
        if run_record_in(q):
            raise SystemExit(f"{flag} {path}: " + ("it is" if q == p else f"{q} is") + " the folder of a training run "
                             "(its config.json is ares.py's run record), whose files are the run's: give a folder "
                             "outside it")


def run_record_in(folder: Path) -> bool:
    """Does `folder` hold ares.py's run record: a config.json with the run's "flags", ares.py's own (a "stage"; another
    tool's config.json may have "flags" too, and every folder above an output is looked at), not a model's?"""
    try:
        return is_run_record(json.loads((folder / "config.json").read_bytes()))
    except (OSError, ValueError):
        return False


def is_run_record(config) -> bool:
    """run_record_in's test of a config.json's contents, as read."""
    return (isinstance(config, dict) and isinstance(config.get("flags"), dict) and "stage" in config["flags"]
            and "model_type" not in config)


def expand_home(args: dict, names) -> dict:
    """The path flags `names` of parsed arguments (a dict: vars() of argparse's namespace, which it changes in place)
    with a leading ~ expanded, a list's items each: --out=~/x reaches the program with its ~ (no shell expands one
    after '='), and the checks read $HOME/x, so the program must read and write it there too."""
    for k in names:
        v = args.get(k)
        if v:
            args[k] = [os.path.expanduser(x) for x in v] if isinstance(v, list) else os.path.expanduser(v)
    return args


def check_new_output(flag: str, path, overwrite: bool, holds: str = ""):
    """An output that is there already is replaced only with --overwrite (as ares.py's run in --out): one line naming
    the flag and the path otherwise, before anything is read. `holds`: what a folder holds, for the line."""
    if Path(path).expanduser().exists() and not overwrite:
        raise SystemExit(f"{flag} {path} " + (f"holds {holds}" if holds else "exists") + ": add --overwrite to replace "
                         f"it, or choose another {flag}")


def write_atomically(path: Path, text: str):
    """Write `text` to `path` through atomic_output."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (numbers to 3 significant digits)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])



# ----------------------------------------------------------------------------------------------------------
# convert: any dataset -> records.
# A preset names a dataset's hub location and maps its columns to ours. Each one was checked against the
# public source in its `confirmed` entry; a dataset whose columns could not be confirmed has no preset (its
# columns can still be given with the --*-col flags). `choices` names a column of options to render into the
# question, `filter` keeps only rows whose columns have the given values, `extra` lists columns carried over,
# `precision_from_answer` gives a decimal answer a `precision` of its own decimals (its data set rounds them).


PRESETS = {
    "virl39k": dict(
        hub="TIGER-Lab/ViRL39K", config=None, split="train", held_out=None,  # 39Krelease.parquet is all there is
        mapping=dict(question="question", answer="answer", images="image", id="qid", source="source"),
        extra=["category", "PassRate_32BTrained", "PassRate_7BBase"],
        notes="AEPO prompts (README: paper settings). `image` holds paths into the repo's images.zip: download the dataset repo, "
              "unzip images.zip next to 39Krelease.parquet and convert that file (--data .../39Krelease.parquet). "
              "Answers are \\boxed{}; `source` is each problem's original dataset (AdaCS lengths are per source).",
        confirmed="columns question, answer, PassRate_32BTrained, PassRate_7BBase, category, source, qid, image "
                  "(relative paths) in public ViRL39K loaders on GitHub (e.g. verl preprocessors citing "
                  "39Krelease.parquet + images.zip)"),
    "geometry3k": dict(
        hub="hiyouga/geometry3k", config=None, split="train",
        mapping=dict(question="problem", answer="answer", images="images", id="id"), precision_from_answer=True,
        notes="Geometry3K (InterGPS), free-form as in EasyR1 and the ARES authors' RL scripts (the card's "
              "`choices` / `ground_truth` columns are not used). Splits train / validation / test. A decimal "
              "answer is the value of InterGPS's right option, rounded (2.4 for sqrt(6), 15.7 for 5 pi): its "
              "record's `precision` is its decimals, so the grader takes any answer that rounds to it.",
        confirmed="hub card features images (sequence of image), problem, answer, id, choices, ground_truth; "
                  "prompt_key problem / answer_key answer / image_key images in github.com/shawn0728/ARES "
                  "examples/config.yaml (commit 89e1908), whose loader splits `problem` on '<image>'"),
    "mathvista-testmini": dict(
        hub="AI4Math/MathVista", config=None, split="testmini",
        mapping=dict(question="question", answer="answer", images="decoded_image", id="pid", choices="choices"),
        extra=["question_type", "answer_type", "unit", "precision"],
        notes="MathVista testmini (1,000). Multiple-choice answers are stored as the option text: converted to "
              "the option's letter.",
        confirmed="hub card (AI4Math/MathVista README) features pid, question, image, decoded_image, choices, unit, "
                  "precision, answer, question_type, answer_type, metadata, query; splits testmini / test"),
    "mathverse-testmini": dict(
        hub="AI4Math/MathVerse", config="testmini", split="testmini",
        mapping=dict(question="query_cot", answer="answer", images="image", id="sample_index"),
        extra=["problem_version", "question_type"],
        notes="MathVerse testmini, all five problem versions (3,940). The question is `query_cot` (the "
              "version-specific text, options included), as in the ARES authors' evaluation loader.",
        confirmed="hub card features sample_index, problem_index, problem_version, question, image, answer, "
                  "question_type, metadata, query_wo, query_cot (config and split testmini); query_cot used by "
                  "github.com/shawn0728/ARES eval/src/utils/data_loaders.py"),
    "mathverse-vision-only": dict(
        hub="AI4Math/MathVerse", config="testmini", split="testmini",
        mapping=dict(question="query_cot", answer="answer", images="image", id="sample_index"),
        filter=dict(problem_version="Vision Only"), extra=["problem_version", "question_type"],
        notes="MathVerse testmini, vision-only version (the problem is only in the image), as in paper §4.",
        confirmed="as mathverse-testmini; the problem_version value 'Vision Only' in MathVerse tooling on GitHub"),
    "mathvision": dict(
        hub="MathLLMs/MathVision", config=None, split="test",
        mapping=dict(question="question", answer="answer", images="decoded_image", id="id", choices="options"),
        extra=["level", "subject"],
        notes="MATH-Vision (3,040; --split testmini for 304). Multiple-choice answers are option letters.",
        confirmed="hub card (MathLLMs/MathVision README) features id, question, options, image, decoded_image, "
                  "answer, solution, level, subject; splits test / testmini; same columns in the ARES authors' "
                  "evaluation loader"),
    "math500": dict(
        hub="HuggingFaceH4/MATH-500", config=None, split="test",
        mapping=dict(question="problem", answer="answer", id="unique_id"), extra=["level", "subject"],
        notes="MATH-500 (text only).",
        confirmed="features problem, solution, answer, subject, level, unique_id of HuggingFaceH4_MATH-500 in "
                  "Hugging Face staff datasets built from it and in its public copies; split test"),
    "gsm8k": dict(
        hub="openai/gsm8k", config="main", split="test",
        mapping=dict(question="question", answer="answer"),
        notes="GSM8K (text only). The answer column is a worked solution ending in '#### N': N is kept.",
        confirmed="openai/gsm8k config main, columns question and answer with the final number after '####' "
                  "(NeMo's GSM8K processor documentation, dataset.ini files referencing main/test-*.parquet)"),
}


FIELDS = ("question", "answer", "images", "response", "id", "source", "choices")


IMAGE_TAG = re.compile(r"<image\s*\d*>")


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalise_answer(answer) -> str:
    r"""The final answer as text: the content of the last \boxed{} if there is one, else the part after the last
    '####' (GSM8K, thousands separators dropped), else the stripped text.
    normalise_answer(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"; normalise_answer("3 + 4 = 7\n#### 1,200") == "1200"."""
    text = str(answer).strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.rsplit("####", 1)[1].strip())
    return text


def clean_question(text: str) -> str:
    """The question without image placeholders ("<image>", "<image1>"): the chat template places the images."""
    return re.sub(r"[ \t]{2,}", " ", IMAGE_TAG.sub("", str(text))).strip()


def render_choices(question: str, choices: list) -> str:
    r"""The one way options are shown: render_choices("Which?", ["x", "y"]) == "Which?\nChoices:\n(A) x\n(B) y"."""
    return question + "\nChoices:\n" + "\n".join(f"({LETTERS[k]}) {str(c).strip()}" for k, c in enumerate(choices))


def choice_letter(answer: str, choices: list) -> str | None:
    """The correct option's letter: of the option whose text is the answer (MathVista stores the text), or the
    answer itself when it is a letter of an option, "(B)" or "b." included (MathVision), or else of the one option
    equal to it as a number ("1" and 1.0) or but for case ("yes" and "Yes"). None if none of these."""
    texts, answer = [str(c).strip() for c in choices], answer.strip()
    if answer in texts:
        return LETTERS[texts.index(answer)]
    letter = _option_letter(answer, len(choices))
    if letter:
        return letter
    for same in (lambda t: _number(t) is not None and _number(t) == _number(answer), lambda t: t.casefold() == answer.casefold()):
        hits = [k for k, t in enumerate(texts) if same(t)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


def _option_letter(answer: str, n: int) -> str | None:
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer.strip())
    return m.group(1).upper() if m and m.group(1).upper() in LETTERS[:n] else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def shows_choices(question: str, choices: list) -> bool:
    """Does the question already list its options: rendered by render_choices (a record written by convert,
    passrate or adacs), or in its own words (MathVerse's "Choices:\nA:30°", inline "(A) 1 (B) 2")? In its own words
    only when a "Choices:" line or every option's "(A)"-style label is there, and the text of every option: a question
    that names a statement "(A)" still gets its options shown."""
    listed = re.search(r"(?im)^\s*choices?\s*:", question) or all(f"({x})" in question for x in LETTERS[:len(choices)])
    return bool(listed) and all(str(c).strip() in question for c in choices)


def with_choices(question: str, answer: str, choices: list) -> tuple[str, str | None, list[str]]:
    """A multiple-choice record as the model and the grader see it: (the question with its options shown once
    (render_choices, unless shows_choices), the answer's letter (record_choice_letter; None: no option),
    the options as text)."""
    options = [str(c).strip() for c in choices]
    shown_once = question if shows_choices(question, options) else render_choices(question, options)
    return shown_once, record_choice_letter(question, answer, options), options


def record_choice_letter(question: str, answer: str, choices: list) -> str | None:
    """choice_letter of a record's answer. Once its options are shown (shows_choices) the answer is read as their
    letter first: options ["B", "A"] with answer "A" mean option A, the text "B", and stay so however many stages
    read the record again (read as a text first, "A" would be option B, then A, then B)."""
    if shows_choices(question, choices):
        return _option_letter(answer, len(choices)) or choice_letter(answer, choices)
    return choice_letter(answer, choices)


def _check_shape(im):
    """An image Qwen-VL's processor takes: one side at most 200 times the other (the tools' and training's rule)."""
    if max(im.size) > 200 * min(im.size):
        raise ValueError(f"it is {im.width}x{im.height} pixels: an aspect ratio over 200, which Qwen-VL's image "
                         "processor refuses")
    return im


@functools.lru_cache(maxsize=100_000)
def _checked_path(path: str) -> str:
    """An image file that exists and decodes in full (verify() does not decode a JPEG, so a truncated one passed),
    with a shape the processor takes; checked once per path: candidate traces share their images."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        _check_shape(im)
    return path


class RelativePath(str):
    """An image path the data gave relative to its file, held absolute so that it opens from any working folder;
    write_records lists it relative to its output file again (an absolute path stays as it is)."""


def load_images(value, base: Path, where: str) -> list:
    """A row's images -> list of PIL images or absolute paths (a RelativePath where the row's was relative), each
    checked readable now (README: data format: bad data fails at load time). value: None, one image or a list of PIL
    images, bytes, {'bytes', 'path'} dicts (how Parquet stores an image column) or paths (relative to `base`, the data
    file's folder)."""
    from PIL import Image

    items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, img in enumerate(items):
        try:
            if isinstance(img, dict):
                img = img.get("bytes") or img.get("path")
            if isinstance(img, Image.Image):
                out.append(_check_shape(img))
            elif isinstance(img, (bytes, bytearray)):
                im = Image.open(io.BytesIO(img))
                im.load()  # decode now: a truncated image fails here, not in the middle of training
                out.append(_check_shape(im))
            elif isinstance(img, (str, os.PathLike)):
                given_absolute = Path(img).is_absolute()
                path = _checked_path(str((Path(img) if given_absolute else base / img).resolve()))
                out.append(path if given_absolute else RelativePath(path))
            else:
                raise TypeError(f"unsupported image type {type(img).__name__}")
        except Exception as e:  # noqa: BLE001 - any failure to decode is the same user error
            shown = f"{len(img)} bytes" if isinstance(img, (bytes, bytearray)) else repr(str(img)[:80])
            raise DataError(f"{where}: image {k} ({shown}) cannot be read: {e}") from None
    return out


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files read_rows reads whole (else a folder or a hub name)


def read_rows(source: str, split: str | None, config: str | None):
    """(rows, base): an iterator of dicts and the folder relative image paths start from. source: a .jsonl or
    .json file (JSON lines or one JSON list), a .parquet file, a folder from datasets' save_to_disk, or a hub name."""
    p = Path(source)
    if p.suffix in RECORD_SUFFIXES and not p.is_file():
        raise DataError(f"{source}: no such file")
    if p.suffix in (".jsonl", ".json"):
        return json_rows(p), data_folder(p).resolve()
    if p.suffix == ".parquet":
        return _parquet_rows(p), data_folder(p).resolve()
    if p.is_file():  # a .csv, a .gz: load_dataset would ask the hub for a dataset of that name
        raise DataError(f"{source}: not a .jsonl, .json, .parquet or saved dataset folder")
    import datasets

    try:
        if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds, base = datasets.load_from_disk(str(p)), data_folder(p).resolve()  # saved with save_to_disk
        else:  # a hub name, or a folder of data files (a downloaded hub repo)
            ds = datasets.load_dataset(source, config, split=split or "train")
            base = p.resolve() if p.is_dir() else Path.cwd()
    except (OSError, ValueError, ImportError) as e:  # not found, offline, corrupt (record_rows says it the same way)
        first_line = str(e).split("\n")[0][:200]
        raise DataError(f"{source}: cannot be read as a dataset: {type(e).__name__}: {first_line}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:  # its only split, else train, as for a hub name
            split = next(iter(ds)) if len(ds) == 1 else "train"
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (it has {', '.join(ds)}); pass --split")
        ds = ds[split]
    return iter(encoded_images(ds)), base


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)  # streamed: image bytes stay bounded
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot be read as Parquet: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for batch in batches:
        yield from batch.to_pylist()


def to_record(row: dict, n: int, cols: dict, required: set, spec: dict, base: Path, where: str, default_source: str):
    """One row -> one record (README: data format), or None when the preset's filter drops it. cols maps our fields to
    columns; a field in `required` must have its column. Raises DataError naming the source and row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: is {json.dumps(row, default=repr)[:60]}, not an object with a question and an answer")
    for col, value in spec.get("filter", {}).items():
        if row.get(col) != value:
            return None

    def get(field):
        col = cols.get(field)
        if col is None or col not in row:
            if field in required:
                raise DataError(f"{where}: no column {col!r} for the {field} (columns: {', '.join(map(str, row))})")
            return None
        return row[col]

    rid = get("id")
    if rid is not None and wrong_type("id", rid):  # str() would turn it into text that passes every later check
        raise DataError(f"{where}: the id (column {cols.get('id')!r}) must be {MUST_BE['id']}, got {shown(rid)}")
    if rid is None or not str(rid).strip():
        if "id" in required:  # a pool's traces are grouped into problems by id
            raise DataError(f"{where}: missing or empty id (column {cols.get('id')!r}): traces are grouped by it")
        rid = f"{default_source}-{n}"
    rid = str(rid).strip()
    where = f"{where} (id {rid})"
    for field in ("question", "answer", "response"):
        if get(field) is not None and wrong_type(field, get(field)):
            raise DataError(f"{where}: the {field} (column {cols.get(field)!r}) must be {MUST_BE[field]}, got "
                            f"{shown(get(field))}")
    question, answer = get("question"), get("answer")
    question = "" if question is None else clean_question(question)
    answer = "" if answer is None else normalise_answer(answer)
    if not question or not answer:
        raise DataError(f"{where}: missing or empty {'question' if not question else 'answer'}")
    choices = get("choices")
    if choices not in (None, "") and not isinstance(choices, (list, tuple)):  # a string would give one option per letter
        raise DataError(f"{where}: the choices (column {cols.get('choices')!r}) must be a list of options, got "
                        f"{shown(choices)}")
    if choices:
        question, letter, options = with_choices(question, answer, choices)
        if letter is None:
            raise DataError(f"{where}: answer {answer!r} is neither an option nor an option letter of {list(choices)}")
        answer, choices = letter, options
    src_col = cols.get("source")
    if src_col and row.get(src_col) not in (None, ""):
        source = str(row[src_col])  # a column of the rows
    elif src_col and src_col != "source":
        source = src_col  # the rows have no such column: it is the name itself (--source NAME)
    else:
        source = default_source
    pass_rate, response = row.get("pass_rate"), get("response")
    if pass_rate is not None and wrong_type("pass_rate", pass_rate):
        raise DataError(f"{where}: pass_rate must be {MUST_BE['pass_rate']}, got {shown(pass_rate)}")
    record = dict(id=rid, question=question, answer=answer, images=load_images(get("images"), base, where),
                  source=source, response=response, pass_rate=pass_rate)
    if choices:  # kept beside the rendered question: the grader also takes the right option's text (Gold)
        record["choices"] = choices
    rounded = re.fullmatch(r"[+-]?\d*\.(\d+)", answer) if spec.get("precision_from_answer") else None
    if rounded:  # a rounded decimal answer (geometry3k): held to its own decimals, as MathVista's `precision`
        record["precision"] = len(rounded.group(1))
    used = {cols.get(f) for f in FIELDS}
    extra = spec["extra"] if "extra" in spec else [k for k, v in row.items() if k not in used and k not in record and
                                                    (isinstance(v, (str, int, float, bool)) or k == "difficulty")]
    record.update({k: row[k] for k in extra if k in row and k not in record})
    return record


def resolve(source: str, preset: str | None, mapping: dict | None, split: str | None, config: str | None):
    """-> (source, spec, cols, required, split, config, default source name) for a source, preset and mapping."""
    if source in PRESETS and preset in (None, source):  # load_source("mathvista-testmini"), with or without
        source, preset = "", source  # preset="mathvista-testmini", reads the preset's hub dataset
    if preset is not None and preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    spec = PRESETS.get(preset, {})
    source = source or spec.get("hub")
    if not source:
        raise DataError("no data: give a file, folder or hub name, or a preset")
    cols = dict(spec["mapping"]) if spec else {f: f for f in FIELDS}  # no preset: our own field names
    cols.update(mapping or {})
    unknown = set(mapping or {}) - set(FIELDS)
    if unknown:
        raise DataError(f"mapping keys must be among {', '.join(FIELDS)}, not {', '.join(sorted(unknown))}")
    explicit = {k for k, v in {**spec.get("mapping", {}), **(mapping or {})}.items() if v}
    required = ({"question", "answer"} | explicit) - {"source"}  # a column named explicitly must exist
    name = preset or (Path(source).stem if Path(source).suffix else Path(source).name)
    return source, spec, cols, required, split or spec.get("split"), config or spec.get("config"), name


def check_problems(records: list[dict], where: str) -> list[dict]:
    """load_source's records through record_problem (empty fields, chat-template tokens), as read_records checks
    training data: the first bad one stops the command (passrate, convert) with one line naming it."""
    for r in records:
        problem = record_problem(r, need_response=False)
        if problem:
            raise DataError(f"{where}: record {r['id']}: {problem}")
    return records


def held_out_split(eval_data: str) -> str:
    """The held-out split that ares.py's --eval-data and eval.py's --data <preset> read: test (a saved folder's, or a
    training preset's: geometry3k's own split is train, the one --data trains on), or a benchmark preset's own
    (mathvista-testmini: testmini). A preset whose data set publishes no held-out split (ViRL39K: train only) raises
    DataError: its test split would be a hub error after the download, and its train split is what --data trains on."""
    spec = PRESETS.get(eval_data, {})
    if "held_out" in spec and spec["held_out"] is None:
        raise DataError(f"{eval_data}: {spec['hub']} publishes a train split only, the one --data {eval_data} trains "
                        "on, so it has no held-out problems: evaluate on a benchmark preset (mathvista-testmini, ...) "
                        "or a file of held-out records (eval.py reads the train split if --split train names it)")
    split = spec.get("split", "test")
    return "test" if split == "train" else split


def load_source(source: str, *, preset: str | None = None, mapping: dict | None = None, split: str | None = None,
                config: str | None = None, limit: int | None = None) -> list[dict]:
    """Records of README: data format from a hub dataset name, a JSONL/JSON/Parquet file or a saved dataset folder.

    preset: a key of PRESETS (hub name, split, config and column mapping); `source` may be the preset's name
    itself, or a local copy of its dataset. mapping: our field -> column, for question, answer, images,
    response, id, source and choices (a column of options rendered into the question); it overrides the
    preset's. `source` names a column or, when the rows have no such column, is the source name itself.
    Without preset or mapping the columns are our own field names and every other plain field is kept.
    Returns dicts with id, question, answer (normalised), images (PIL images or absolute paths: open_image
    opens either), source, response (or None), pass_rate (or None), plus extra fields (level, ...). The first
    `limit` records kept. Raises DataError naming the source and row for a bad row or a duplicate id."""
    return _load(source, preset=preset, mapping=mapping, split=split, config=config, limit=limit)


def _load(source: str, *, preset=None, mapping=None, split=None, config=None, limit=None, progress=False,
          unique=True) -> list[dict]:
    """load_source, with a progress bar, and `unique=False` for pools of traces (several records per id)."""
    source, spec, cols, required, split, config, name = resolve(source, preset, mapping, split, config)
    required = required if unique else required | {"id"}  # a pool's traces need the id of their problem
    rows, base = read_rows(source, split, config)
    label = source + (f" (preset {preset})" if preset else "")
    records, seen = [], {}
    for n, row in enumerate(tqdm(rows, desc=f"read {name}", disable=not progress, unit=" rows")):
        rec = to_record(row, n, cols, required, spec, base, f"{label}: row {n}", name)
        if rec is None:
            continue
        if unique and rec["id"] in seen:
            raise DataError(f"{label}: rows {seen[rec['id']]} and {n} share the id {rec['id']!r}")
        seen[rec["id"]] = n
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{label}: no records")
    return records


def write_records(records: list[dict], out: Path, copy_images: bool = True) -> Path:
    """Write records as JSONL, or Parquet when `out` ends in .parquet. Images go to <out stem>_images/ as PNG
    and are listed relative to the output file (README: data format). copy_images=False lists an image that is already a
    file by its path instead of copying it: an absolute one as it is (the output can move), one the input gave relative
    (a RelativePath) relative to the output file. Records sharing an image object share its file."""
    out = Path(out)
    if out.suffix == ".parquet":
        check_columns(records, out)
    img_dir = images_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging(img_dir.with_name(img_dir.name + ".tmp")) as staged:  # the images, until the records are written
        return write_staged(records, out, img_dir, staged, copy_images)


def check_columns(records: list[dict], out: Path):
    """A Parquet column holds one type, and integers of 64 bits: JSON lines may give a field a number in one record and
    text in another (a `difficulty` of 1 and "hard"), or an integer of any size. DataError naming the records and the
    field, before anything is written (pyarrow's error names neither). Integers and floats share a column."""
    first = {}  # field -> (its kind, the record that set it)
    for r in records:
        for k, v in r.items():
            if v is None or k == "images":
                continue
            if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
                raise DataError(f"{out}: record {r['id']}: field {k!r} is {shown(v)}, past Parquet's 64-bit integers: "
                                "write .jsonl")
            kind = ("true or false" if isinstance(v, bool) else "a number" if isinstance(v, (int, float)) else
                    "text" if isinstance(v, str) else f"a {type(v).__name__}")
            was, rid = first.setdefault(k, (kind, r["id"]))
            if kind != was:
                raise DataError(f"{out}: field {k!r} is {was} in record {rid} and {kind} in record {r['id']}: a Parquet "
                                "column holds one type: give the field one type, or write .jsonl")


def images_folder(out: Path) -> Path:
    """Where write_records puts the images of `out`: <out stem>_images/ beside it, named 0000000_0.png, ... (x.jsonl,
    x.json and x.parquet share one, so check_args lets no output replace another's, nor a folder of the user's own)."""
    return out.parent / f"{out.stem}_images"


def write_staged(records: list[dict], out: Path, img_dir: Path, staged: Path, copy_images: bool) -> Path:
    """write_records' work: the images into `staged`, the records into a temporary file, then swap_in_images, then the
    records in place."""
    from PIL import Image

    saved, rows = {}, []
    for n, rec in enumerate(tqdm(records, desc=f"write {out.name}", unit=" records", leave=False)):
        paths = []
        for k, img in enumerate(rec.get("images") or []):
            if id(img) not in saved:
                if isinstance(img, str) and not copy_images:
                    saved[id(img)] = os.path.relpath(img, out.parent) if isinstance(img, RelativePath) else img
                else:
                    with Image.open(img) if isinstance(img, str) else contextlib.nullcontext(img) as im:
                        (im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")).save(staged / f"{n:07d}_{k}.png",
                                                                                           format="PNG")
                    saved[id(img)] = f"{img_dir.name}/{n:07d}_{k}.png"
            paths.append(saved[id(img)])
        rows.append(dict(rec, images=paths))
    with atomic_output(out) as tmp:
        if out.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(r, default=str) + "\n" for r in rows)
        if any(staged.iterdir()):  # the records are whole in tmp: now the images, then (leaving the block) the records
            swap_in_images(staged, img_dir, [out])
    return out


def run_convert(args) -> list[dict]:
    mapping = {f: getattr(args, f"{f}_col") for f in FIELDS if f != "source" and getattr(args, f"{f}_col")}
    if args.source:
        mapping["source"] = args.source
    records = _load(args.data or "", preset=args.preset, mapping=mapping or None, split=args.split,
                    config=args.config, limit=args.limit, progress=True)
    check_problems(records, args.data or args.preset)
    out = write_records(records, Path(args.out))
    per = defaultdict(Counter)
    for r in records:
        per[r["source"]].update(records=1, images=bool(r["images"]), choices="\nChoices:\n" in r["question"],
                                response=r["response"] is not None)
    rows = [[s, c["records"], c["images"], c["choices"], c["response"]] for s, c in sorted(per.items())]
    print(table(["source", "records", "with images", "multiple choice", "with response"], rows))
    print(f"wrote {len(records)} records to {out}")
    return records



# ----------------------------------------------------------------------------------------------------------
# adacs: length-matched traces, equal counts per difficulty (paper §3.1; README: AdaCS curation).


MAX_K = 1024  # adacs --k: samples per problem; far more than any pass rate is measured with (the paper's K is 8)


def bracket_of(p: float, k: int) -> int:
    """Pass-rate bracket round(p * K) in 0..K; K = 8 gives the 9 brackets 0, 1/8, ..., 1 of §3.1; README: AdaCS curation."""
    return int(round(p * k))


def check_pass_rates(records: list[dict], k: int, where: str, most: int = 64) -> list[dict]:
    """Every pass rate read (None: computed later) is c/K for K = --k, so that round(p K) is its bracket: K = 16 rates
    read with K = 8 put p = 1/16 in bracket 0, counted toward L(0), and fill the brackets unevenly. A rate written
    rounded to 2 decimals or finer passes (0.38 for 3/8, 0.33 for 1/3) while K <= 100; past that, 2 decimals no longer
    name one c/K (0.05 is 0.003 from 6/128, and may be 7/128 rounded), so rates must be written to 6 decimals (passrate
    writes them exactly). The first that does not stops the command,
    naming the smallest K <= `most` of which every rate is an exact multiple, if there is one (rounded rates fit
    K = 100 exactly, which would be no advice). K is checked, not inferred from the data: rates that all happen to be
    multiples of 1/4 may come from K = 8, and the brackets would change with the data."""
    def near(p, n, tol):  # within tol of its bracket's rate
        return abs(p - bracket_of(p, n) / n) <= tol
    rated = [r for r in records if r.get("pass_rate") is not None]
    bad = next((r for r in rated if not near(r["pass_rate"], k, 0.005 + 1e-9 if k <= 100 else 1e-6)), None)
    if bad is None:
        return records
    rates = {r["pass_rate"] for r in rated}
    like = next((n for n in range(1, most + 1) if all(near(p, n, 1e-9) for p in rates)), None)
    raise DataError(f"{where}: record {bad['id']}: pass_rate {bad['pass_rate']:g} is not a multiple of 1/{k} (--k {k})"
                    + (f": the pass rates look like K = {like} (pass --k {like})" if like else ": give --k the number "
                       "of samples per problem the pass rates were measured with (a pass rate is c/K: c right of K)")
                    + (", written to 6 decimals or more (past K = 100, a rate rounded to 2 decimals fits no single c/K)"
                       if k > 100 else ""))


def anchor_lengths(lengths: dict[int, list[int]]) -> tuple[float, float, int, int]:
    """Step 2 for one source: L(0), L(1) = median length of the candidate traces (right or wrong) of its problems
    with p = 0 and p = 1. lengths: {bracket: trace lengths}. A missing end falls back to the nearest bracket
    present (the lowest for L(0), the highest for L(1)). Returns (L0, L1, bracket of L0, bracket of L1).
    anchor_lengths({0: [10, 30], 2: [5], 4: [4, 6]}) == (20, 5, 0, 4)."""
    present = sorted(b for b, v in lengths.items() if v)
    lo, hi = present[0], present[-1]
    return statistics.median(lengths[lo]), statistics.median(lengths[hi]), lo, hi


ANCHOR_RATIO = 1.2  # L(0) must exceed L(1) by this factor for the targets to tell hard problems from easy ones


def anchor_warning(source: str, l0: float, l1: float, ratio: float = ANCHOR_RATIO,
                   only: str | None = None) -> str | None:
    """A warning, in words a user acts on, when a source's L(0) is not clearly above its L(1) (L(0) < ratio * L(1)):
    then L_target(p) barely changes with p, every problem gets about the same length of trace, the cold start writes
    one length everywhere, and AEPO has no length to adapt (README: AdaCS curation). None when the anchors differ.
    `only`: the pass rate ("4/8") every problem of the source has, so that both anchors are that bracket's median."""
    if l0 >= ratio * l1:
        return None
    if only:  # no hard and easy problems to compare: longer traces would not help, other pass rates would
        return (f"warning: source {source!r}: every problem has the pass rate {only}, so L(0) = L(1) = {l0:g} tokens "
                f"and the cold start will write one length on all of them. Measure the pass rates with a model that "
                f"fails some of its problems and solves others, or leave it out, before training on this data.")
    return (f"warning: source {source!r}: L(0) = {l0:g} tokens is not clearly above L(1) = {l1:g} (less than "
            f"{ratio:g}x): its traces are no longer on the problems the model fails than on those it solves, so the "
            f"length targets cannot differ with difficulty and the cold start will write one length everywhere. Give "
            f"its hard problems longer candidate traces (more steps, a re-check), or measure the pass rates with a "
            f"model that finds some of them hard, before training on this data.")


def target_length(p: float, l0: float, l1: float) -> float:
    """Step 3: L_target(p) = (1 - p) L(0) + p L(1): the hardest problems get the length of hard traces."""
    return (1 - p) * l0 + p * l1


def pick_trace(traces: list[dict], target: float) -> dict | None:
    """Step 4: the correct trace whose length is nearest the target; ties go to the shorter one, then the first.
    None when no trace is correct (a wrong trace is never chosen)."""
    correct = [t for t in traces if t["correct"]]
    return min(correct, key=lambda t: (abs(t["length"] - target), t["length"])) if correct else None


def balance(chosen: dict[int, list], per_bracket: int | None, seed: int) -> dict[int, list]:
    """Step 5: the same count from every bracket: `per_bracket` (a bracket with fewer keeps all it has), or by
    default the size of the smallest non-empty bracket. A fuller bracket keeps a seeded random subset, in order."""
    n = per_bracket if per_bracket is not None else min((len(v) for v in chosen.values() if v), default=0)
    rng = random.Random(seed)
    return {b: v if len(v) <= n else [v[i] for i in sorted(rng.sample(range(len(v)), n))]
            for b, v in sorted(chosen.items())}


def prepare_pool(pool: list[dict], tokenizer=None, source: str = "the pool", k: int | None = None) -> dict[str, list[dict]]:
    """{problem id: its traces}, each with `correct` (graded now if absent) and `length` in tokens (counted with
    `tokenizer` if absent), and the problem's pass rate (its traces' fraction correct if absent; with `k`, that must be
    a multiple of 1/k). An empty response is a wrong trace of length 0; a missing one stops the pool (`source` names
    its file)."""
    problems = defaultdict(list)
    for rec in pool:
        where = f"{source}: trace of problem {rec['id']!r}"
        if rec.get("response") is None:
            raise DataError(f"{where}: field 'response' is missing")
        correct = rec.get("correct")
        if correct is not None and correct not in (True, False):  # bool("false") is True: a wrong trace chosen
            raise DataError(f"{where}: field 'correct' must be true or false, got {json.dumps(correct, default=repr)[:60]}")
        correct = bool(correct) if correct is not None else grade([rec["response"]], gold_of(rec))[0]
        # An empty response (a sample that ended at once) stays a wrong trace of its length, 0 tokens: it is one of the
        # K samples behind p, and L(0), L(1) are medians over all of them, right or wrong (skipping it would measure
        # the anchors on other samples than p counts, and raise L(0) most: an empty sample is a wrong one).
        if correct and not rec["response"]:  # it would be chosen, and the cold start refuses an empty response
            raise DataError(f"{where}: field 'response' is empty but 'correct' is true")
        length = rec.get("length")
        if length is None:
            if tokenizer is None:
                raise DataError(f"{where}: no 'length'; pass --model to count tokens with its tokenizer")
            length = len(tokenizer(rec["response"], add_special_tokens=False)["input_ids"])
        elif isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise DataError(f"{where}: field 'length' must be a count of tokens (an integer >= 0), got "
                            f"{json.dumps(length, default=repr)[:60]}; leave it out and pass --model to count them")
        problems[rec["id"]].append(dict(rec, correct=correct, length=int(length)))
    for pid, traces in problems.items():
        for field in ("source", "question", "answer"):  # one id on two problems would merge them, and their anchors
            if len(values := {t[field] for t in traces}) > 1:
                raise DataError(f"{source}: problem {pid!r}: its traces disagree on the {field} ({sorted(values)}): an "
                                f"id names one problem, so give each problem its own (a source prefix)")
        rates = {t["pass_rate"] for t in traces}
        if len(rates) > 1:
            raise DataError(f"{source}: problem {pid!r}: its traces disagree on the pass rate ({sorted(rates, key=str)})")
        if None in rates:
            right = sum(x["correct"] for x in traces)
            if k and right * k % len(traces):  # c / n must be a multiple of 1/K, as check_pass_rates asks of a rate read
                raise DataError(f"{source}: problem {pid!r}: {right} of its {len(traces)} traces are right, a pass rate "
                                f"that is not a multiple of 1/{k} (--k {k}), so it has no bracket: give --k the number "
                                f"of samples per problem, or each trace a pass_rate")
            for t in traces:
                t["pass_rate"] = right / len(traces)
    return problems


def adacs_curate(pool: list[dict], k: int = 8, per_bracket: int | None = None, seed: int = 0, tokenizer=None,
                 source: str = "the pool"):
    """AdaCS steps 2-5 (§3.1) on candidate traces (one record per trace, grouped by id; see prepare_pool; `source`
    names the pool's file in errors). Returns (chosen records, one per kept problem, with `target_length`, ordered
    by bracket; stats)."""
    problems = prepare_pool(pool, tokenizer, source, k)
    lengths = defaultdict(lambda: defaultdict(list))  # source -> bracket -> every candidate trace length
    for traces in problems.values():
        lengths[traces[0]["source"]][bracket_of(traces[0]["pass_rate"], k)] += [t["length"] for t in traces]
    anchors = {src: anchor_lengths(by) for src, by in lengths.items()}
    chosen, dropped = defaultdict(list), Counter()
    for traces in tqdm(problems.values(), desc="adacs", leave=False):
        p, src = traces[0]["pass_rate"], traces[0]["source"]
        # p as its bracket's c/K, exactly: a rate written rounded (0.38 for 3/8) gets 3/8's target, and a tie stays a
        # tie (in floats 2/3 * 20 + 1/3 * 2 is 14.000000000000002, and the longer trace won it)
        target = target_length(Fraction(bracket_of(p, k), k), *map(Fraction, anchors[src][:2]))
        best = pick_trace(traces, target)
        if best is None:
            dropped[src] += 1
        else:
            chosen[bracket_of(p, k)].append(dict(best, target_length=float(target)))
    kept = balance(chosen, per_bracket, seed)
    before = defaultdict(list)
    for traces in problems.values():
        before[bracket_of(traces[0]["pass_rate"], k)].append(traces)
    stats = dict(anchors=anchors, dropped=dict(dropped), problems=Counter(t[0]["source"] for t in problems.values()),
                 before={b: (len(v), statistics.mean(t["length"] for ts in v for t in ts)) for b, v in before.items()},
                 selected={b: len(v) for b, v in chosen.items()},
                 after={b: (len(v), statistics.mean(t["length"] for t in v) if v else None) for b, v in kept.items()})
    return [r for b in sorted(kept) for r in kept[b]], stats


def tokenizer_for(name: str):
    if name == "tiny":
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def join_pass_rates(pool: list[dict], rated: list[dict], where: str) -> list[dict]:
    """The paper's setting (§3.1; README: AdaCS curation): candidate traces from a teacher pool, pass rates from another model's samples.
    Each trace takes the pass rate of its problem id in `rated`; traces of problems that were not rated are
    dropped (and counted). `rated` may repeat an id with one rate (passrate --keep-responses: K records a problem).
    join_pass_rates([{id: a, ...}, {id: b, ...}], [{id: a, pass_rate: .5}], f) keeps a."""
    missing = [r["id"] for r in rated if r["pass_rate"] is None]
    if missing:
        raise DataError(f"{where}: record {missing[0]}: no pass_rate (write it with `eval.py passrate`)")
    rates = {}
    for r in rated:
        if rates.setdefault(r["id"], r["pass_rate"]) != r["pass_rate"]:
            raise DataError(f"{where}: problem {r['id']!r}: its records disagree on the pass rate "
                            f"({sorted({rates[r['id']], r['pass_rate']})})")
    joined = [dict(t, pass_rate=rates[t["id"]]) for t in pool if t["id"] in rates]
    if not joined:
        raise DataError(f"{where}: no problem id in common with the candidate traces")
    unrated = len({t["id"] for t in pool}) - len({t["id"] for t in joined})
    if unrated:
        print(f"{unrated} problems of the pool have no pass rate in {where}: their traces are left out")
    return joined


def run_adacs(args) -> list[dict]:
    pool = check_problems(_load(args.data, split=args.split, progress=True, unique=False), args.data)  # as convert
    if args.pass_rates:
        rated = check_pass_rates(_load(args.pass_rates, unique=False), args.k, args.pass_rates)  # a pool's ids repeat
        pool = join_pass_rates(pool, rated, args.pass_rates)
    else:
        pool = check_pass_rates(pool, args.k, args.data)
    chosen, st = adacs_curate(pool, args.k, args.per_bracket, args.seed, tokenizer_for(args.model) if args.model else None,
                              args.data)
    if not chosen:
        raise DataError(f"{args.data}: no problem has a correct trace")
    write_records(chosen, Path(args.out), copy_images=False)
    print(table(["source", "problems", "dropped (no correct trace)", "L(0)", "from p", "L(1)", "from p"],
                [[s, st["problems"][s], st["dropped"].get(s, 0), f"{a[0]:g}", f"{a[2]}/{args.k}", f"{a[1]:g}",
                  f"{a[3]}/{args.k}"]  # as computed and as the warning gives them, not to 3 digits
                 for s, a in sorted(st["anchors"].items())]))
    for s, a in sorted(st["anchors"].items()):
        if warning := anchor_warning(s, a[0], a[1], only=f"{a[2]}/{args.k}" if a[2] == a[3] else None):
            print(warning)
    rows = []
    for b in range(args.k + 1):
        n0, m0 = st["before"].get(b, (0, None))
        n1, m1 = st["after"].get(b, (0, None))
        rows.append([f"{b}/{args.k}", n0, m0 if m0 is not None else "-", st["selected"].get(b, 0), n1,
                     m1 if m1 is not None else "-"])
    print(table(["pass rate", "problems", "mean tokens (all traces)", "with a correct trace", "kept",
                 "mean tokens (kept)"], rows))
    smallest, b = min((n, b) for b, n in st["selected"].items())
    if args.per_bracket is None and len(chosen) < sum(st["selected"].values()):  # the count a user may not expect
        print(f"every bracket keeps {smallest} problem{'s' * (smallest != 1)}, as many as the smallest, p = "
              f"{b}/{args.k}, has: {len(chosen)} of the {sum(st['selected'].values())} with a correct trace; "
              f"--per-bracket N keeps up to N from each")
    print(f"kept {len(chosen)} of {sum(st['problems'].values())} problems; wrote {args.out}")
    return chosen



# ----------------------------------------------------------------------------------------------------------
# demo: the offline task that `python ares.py` runs end to end, and the tiny model's tokenizer.


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


TINY_CORPUS = " ".join([FORMAT_PROMPT] * 4 + [  # the demo task's words, repeated so that BPE merges them
    "<think>Red is 3. Blue is 2. Green is 0. Yellow is 4. Compute: (3 + 2) * (0 + 4) = 20.</think> "
    "<think>Yellow is 1. Green is 2. Red is 3. Blue is 4.</think> <think>Green is 1. Yellow is 2.</think> "
    "<think>Blue is 1. Red is 2.</think> "
    "The answer is \\boxed{20}. Wait, check again: 3 + 2 = 5, 0 + 4 = 4, 5 * 4 = 20. Hmm, Actually, verify again: "
    "So, Thus, Yes, the answer is 20.",
    "How long is the red bar? What is the sum of the green and blue bars? Add the green and blue bars and the red "
    "and yellow bars, then multiply the sums."] * 4 + [
    "Count the red squares: 3. Subtract: 6 - 1 = 5. How many squares are in the image? in total",
    "step first second then next finally total sum difference product number numbers count counts more less",
    "wait however but alternatively check verify actually perhaps maybe therefore thus hmm so because",
    "the a an of in on is are and or to with from for by it this that there what which how many much",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } , . : ; ? ! A B C D E x y z \\frac{1}{2}",
])


def tiny_tokenizer():
    """A byte-level BPE tokenizer (512 tokens plus the Qwen special tokens) trained here on TINY_CORPUS: offline."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TINY_CORPUS], trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


COLOURS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 60, 220), "yellow": (230, 190, 0)}


LEVELS = {1: "easy", 2: "medium", 3: "hard"}


CELL, UNIT = 28, 7  # one 28-px cell per bar (one merged vision token); a bar of value v is 7 v px long


STYLES = ("terse", "steps", "recheck")  # the teacher pool: three traces of growing length per problem


OPENERS = ("Wait", "Hmm", "Actually")  # a re-check opens, names itself and closes with a free choice of words, as
VERBS = ("check", "verify")  # real overthinking does ('Hmm, verify again: ... Thus, the answer is 3.'): each choice
CLOSERS = ("So", "Thus", "Yes")  # is a high-entropy token, the opener and the verb reasoning words (--trigger-words)

# The teacher slips, as a real one does, and AdaCS keeps only its right traces (README: the teacher pool):
MISREAD = 0.9  # it misreads a short bar (0 or 1 units: little ink) unless it re-checks: for this share of the easy
# problems whose bar is short, its terse and steps traces read the other short length. So the cold start learns to
# re-check short bars, which the model itself reads well: the overthinking on simple questions that AEPO should trim.
SLIP = 0.8  # its bare answer to a medium or hard problem (no work shown) is one off with this probability, so AdaCS
# mostly gives those problems a trace with the work.
LINE_SLIP = 0.4  # its one-line arithmetic (the steps trace of a medium or hard problem) is off with this probability;
# its re-check, which works the operations out one at a time, catches the slip and answers right. So AdaCS gives
# the hardest problems a re-check where the line slipped, and the warm-up's re-checks show that a re-check recomputes.


def demo_style(response: str) -> str:
    """Which of the STYLES a demo response follows, read from its thinking: a re-check says ' again:' ('check
    again:'), the steps read a length ('Red is 3.'), a terse trace does neither."""
    think = response.split("</think>")[0]
    return "recheck" if " again:" in think else "steps" if " is " in think else "terse"


def demo_problem(rng: random.Random, level: int) -> dict:
    """One problem: four coloured bars in a column, in random order, whose lengths are the numbers 0-4, the question,
    the answer and its candidate traces, one per style, each '<think> ... </think> The answer is \\boxed{N}.':
      terse    the answer alone
      steps    every length read, then the arithmetic in one line ('Compute: 3 * 2 + 4 * 1 = 10.')
      recheck  steps, then after a transition word the arithmetic again, one operation at a time ('Wait, check
               again: 3 * 2 = 6, 4 * 1 = 4, 6 + 4 = 10.'; on an easy problem the length again), and its answer
    Levels: easy reads one bar, medium adds two (a + b: one operation, so the re-check only repeats it), hard
    multiplies two sums ((a + b) * (c + d): three operations, which a small model gets right more often worked out
    one at a time than in one line). Also the teacher's slips, which make_demo draws: `slips`, wrong traces (on an easy
    problem whose bar is 0 or 1 units long, terse and steps reading the other short length; on a medium or hard
    one, a terse answer one off, and `line`: a steps trace whose line is off), and on a hard problem `caught`: the
    re-check that catches that slipped line."""
    order = rng.sample(list(COLOURS), len(COLOURS))
    v = {c: rng.randint(0, 4) for c in order}
    a, b, c, d = rng.sample(order, 4)
    if level == 1:
        question, answer, used, expr, ops = f"How long is the {a} bar?", v[a], [a], "", []
    elif level == 2:
        answer, used = v[a] + v[b], [a, b]
        question = f"What is the sum of the {a} and {b} bars?"
        expr, ops = f"{v[a]} + {v[b]}", [f"{v[a]} + {v[b]} = {answer}"]
    else:
        p, q = v[a] + v[b], v[c] + v[d]
        answer, used = p * q, [a, b, c, d]
        question = f"Add the {a} and {b} bars and the {c} and {d} bars, then multiply the sums."
        expr, ops = f"({v[a]} + {v[b]}) * ({v[c]} + {v[d]})", [f"{v[a]} + {v[b]} = {p}", f"{v[c]} + {v[d]} = {q}",
                                                               f"{p} * {q} = {answer}"]
    reads = [f"{s.capitalize()} is {v[s]}." for s in used]
    opener, verb, closer = rng.choice(OPENERS), rng.choice(VERBS), rng.choice(CLOSERS)
    check = ", ".join(ops) if ops else ", ".join(str(v[s]) for s in used)
    steps = lambda line: reads + ([f"Compute: {expr} = {line}."] if ops else [])  # noqa: E731
    recheck = lambda line: steps(line) + [f"{opener}, {verb} again: {check}.", f"{closer}, the answer is {answer}."]  # noqa
    trace = lambda think, n: f"<think>{' '.join(think)}</think> The answer is \\boxed{{{n}}}."  # noqa: E731
    traces = {"terse": trace([f"{answer}."], answer), "steps": trace(steps(answer), answer),
              "recheck": trace(recheck(answer), answer)}
    if level > 1:
        off = answer + rng.choice([d for d in (-2, -1, 1, 2) if answer + d >= 0])  # a slipped line's value
        slips = {"terse": trace([f"{answer + 1}."], answer + 1), "line": trace(steps(off), off)}
        caught = trace(recheck(off), answer) if level == 3 else None
    else:
        misread = 1 - answer
        slips = {"terse": trace([f"{misread}."], misread), "steps": trace([f"{a.capitalize()} is {misread}."], misread)
                 } if answer <= 1 else {}
        caught = None
    return dict(cells=[(col, v[col]) for col in order], question=question, answer=str(answer), traces=traces,
                slips=slips, caught=caught)


def draw_grid(cells: list[tuple[str, int]]):
    """The column of bars, one 28-px cell each: one merged vision token of Qwen2.5-VL (14-pixel patches, 2 x 2
    merge). The top two patches hold the colour, the bottom two a black bar of UNIT px per unit from the left, so a
    length is read from one token, found by its colour, wherever the bar stands."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (CELL, len(cells) * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (colour, value) in enumerate(cells):
        top = k * CELL
        draw.rectangle([0, top, CELL - 1, top + CELL // 2 - 1], fill=COLOURS[colour])
        if value:
            draw.rectangle([0, top + CELL // 2, UNIT * value - 1, top + CELL - 1], fill=(0, 0, 0))
    return img


def make_demo(out: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the demo task under `out`: one .jsonl per split plus their PNG images; levels balanced in every split,
    deterministic for a seed. Returns {split: path}. Splits:
      sft    one trace per problem, its style drawn at random: the warm-up data that teaches the random tiny model to
             read and reason, and to answer in any of the three styles (a base model whose length varies, as the
             paper's earlier reasoning model does: its pass rates then fall with the level, and AdaCS has a
             choice to make)
      pool   the problems whose pass rates the reference policy measures (one record each), and beside it
             pool_traces.jsonl: every candidate trace of each (one record per trace, `style` says which), the
             teacher pool that AdaCS chooses from, joined with the pass rates by id. The teacher slips as a real
             one does (MISREAD, SLIP, LINE_SLIP): some of its traces are wrong, and AdaCS keeps only right ones
      rl, test   prompts for AEPO and held-out evaluation
    Every record of pool, rl and test carries its steps trace as `response`."""
    sizes = sizes or {"sft": 1500, "pool": 1200, "rl": 1000, "test": 300}
    out = Path(out)
    with staging(out / "images.tmp") as staged:  # the images, until the records are written: see swap_in_images
        rng = random.Random(seed)
        teacher = random.Random(f"teacher-{seed}")  # its own stream: the problems do not depend on the slip rates
        splits, traces = {}, []  # {split: its records}
        for split, n in sizes.items():
            rows = []
            for k in tqdm(range(n), desc=f"demo {split}", leave=False):
                level = k % 3 + 1
                prob = demo_problem(rng, level)
                rid = f"{split}-{k:05d}"
                draw_grid(prob["cells"]).save(staged / f"{rid}.png", format="PNG")
                style = rng.choice(STYLES) if split == "sft" else "steps"
                row = dict(id=rid, question=prob["question"], answer=prob["answer"], images=[f"images/{rid}.png"],
                           source="demo", level=level, difficulty=LEVELS[level])
                caught = split == "sft" and style == "recheck" and level == 3 and teacher.random() < LINE_SLIP
                rows.append(dict(row, response=prob["caught"] if caught else prob["traces"][style], style=style))
                if split == "pool":
                    written = dict(prob["traces"])
                    if level == 1 and prob["slips"] and teacher.random() < MISREAD:
                        written.update(prob["slips"])  # a short bar misread: terse and steps wrong, the re-check right
                    if level > 1 and teacher.random() < SLIP:
                        written["terse"] = prob["slips"]["terse"]  # a bare answer one off
                    if level == 3 and teacher.random() < LINE_SLIP:
                        written.update(steps=prob["slips"]["line"], recheck=prob["caught"])  # the line off, re-check right
                    traces += [dict(row, response=written[s], style=s) for s in STYLES]
            splits[split] = rows
        if traces:
            splits["pool_traces"] = traces
        texts = {name: "".join(json.dumps(r) + "\n" for r in rows) for name, rows in splits.items()}  # all, then swap
        swap_in_images(staged, out / "images", [out / f"{name}.jsonl" for name in [*sizes, "pool_traces"]])
        for name, text in texts.items():
            write_atomically(out / f"{name}.jsonl", text)
    return {name: out / f"{name}.jsonl" for name in texts}


DEMO_FILES = ("sft", "pool", "pool_traces", "rl", "test")  # the .jsonl files make_demo writes, beside images/


def not_the_demos(out: Path) -> Path | None:
    """The first file in `out` that make_demo would replace but did not write (a user's images/photo.png or test.jsonl:
    an image not named as the demo names its own, records whose first is not the demo's), or None."""
    images = out / "images"
    if images.exists() and not images.is_dir():
        return images
    theirs = [p for p in images.iterdir() if not re.fullmatch(r"(sft|pool|rl|test)-\d{5,}\.png", p.name)] if \
        images.is_dir() else []
    theirs += [p for p in (out / f"{name}.jsonl" for name in DEMO_FILES) if p.exists() and not demo_records(p)]
    return theirs[0] if theirs else None


def demo_records(path: Path) -> bool:
    """Is the first record of `path` one that make_demo wrote?"""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.readline()).get("source") == "demo"
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: not the demo's
        return False


@contextlib.contextmanager
def staging(path: Path):
    """An empty folder at `path` for a rewrite's images (one a killed run left is emptied first); removed at the end
    unless swap_in_images took it (a failed rewrite, or one without images)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def swap_in_images(staged: Path, images: Path, records: list[Path]):
    """Put a rewrite's images in place, whose records are written next: first the earlier `records` go (they name
    images by path, and the paths stay), then the staged folder replaces `images` (renamed aside, then deleted). A
    kill before this leaves the earlier output whole; during it or before the new records are written, no records:
    never records beside another record's image (README: outputs)."""
    for path in records:
        path.unlink(missing_ok=True)
    old = images.with_name(images.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if images.exists():
        images.rename(old)
    staged.rename(images)
    fsync(images.parent)
    shutil.rmtree(old, ignore_errors=True)


def run_demo(args) -> dict:
    paths = make_demo(Path(args.out), args.seed, {"sft": args.sft, "pool": args.pool, "rl": args.rl, "test": args.test})
    rows = []
    for split, path in paths.items():
        recs = [json.loads(line) for line in open(path)]
        for level, name in LEVELS.items():
            mine = [r for r in recs if r["level"] == level]
            rows.append([split, name, len(mine), statistics.mean(len(r["response"]) for r in mine) if mine else "-"])
    print(table(["split", "level", "records", "mean trace characters"], rows))
    print("\n".join(f"{split}: {path}" for split, path in paths.items()))
    return paths



# ----------------------------------------------------------------------------------------------------------
# Command line.


class OneLineParser(argparse.ArgumentParser):
    """argparse for every tool of the project (ares.py, eval.py, bench.py use it too): a flag of the wrong type or
    choice is one line naming the flag and what it takes, where argparse prints its whole usage first."""

    def error(self, message):
        let_local_rank_0_say_it()
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


SAY_AFTER_S = 10.0  # how long a rank waits for its node's local rank 0 to say the line that stops them both


def let_local_rank_0_say_it():
    """Under torchrun every rank of a node parses the same flags and reads the same data before the process group
    forms, so a line that stops one stops them all, and was printed once per rank (8 times on 8 GPUs). Local rank 0
    says it at once; the others wait SAY_AFTER_S first, and torchrun stops them when local rank 0 exits. One still
    running after that met a line of its own (rank 0 went on) and says it: a rank is never silenced, only delayed.
    (Exiting at once in silence was not enough: torchrun stopped local rank 0 before it had printed, at times.)"""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(SAY_AFTER_S)


def command_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    conv = sub.add_parser("convert", help="any dataset -> records (README: data format), by presets or column flags",
                          formatter_class=fmt, epilog="presets:\n" + "\n".join(
                              f"  {k:22s} {v['hub']} [{v['split']}]: {v.get('notes', '')}" for k, v in PRESETS.items()))
    conv.add_argument("--data", help="hub dataset name, .jsonl/.json/.parquet file or saved dataset folder "
                                     "(default: the preset's hub dataset)")
    conv.add_argument("--preset", choices=sorted(PRESETS), help="column mapping, split and hub name of a known dataset")
    conv.add_argument("--split", help="split to read (default: the preset's, else train)")
    conv.add_argument("--config", help="hub dataset configuration (subset)")
    for f, what in (("question", "question text"), ("answer", "final answer (a \\boxed{} is unwrapped)"),
                    ("image", "image(s): a list or one of paths, bytes, {'bytes','path'} or images"),
                    ("response", "reasoning trace (cold start)"), ("id", "unique id (default: row number)"),
                    ("choices", "list of options to render into the question")):
        conv.add_argument(f"--{f}-col", dest=f"{'images' if f == 'image' else f}_col", metavar="COLUMN",
                          help=f"column of the {what}")
    conv.add_argument("--source", help="column of the data source, or the source name itself (default: the "
                                       "preset or file name)")
    conv.add_argument("--limit", type=int, help="stop after this many records")
    conv.add_argument("--out", required=True, help="output .jsonl or .parquet; images go to <stem>_images/")
    conv.add_argument("--overwrite", action="store_true", help="replace --out (and its images) if it exists")

    ad = sub.add_parser("adacs", help="curate length-matched traces from a candidate pool (§3.1; README: AdaCS curation steps 2-5)")
    ad.add_argument("--data", required=True, help="candidate traces: one record per trace with id, pass_rate, "
                                                  "response, and correct / length (else computed)")
    ad.add_argument("--split", help="split to read from a dataset folder or hub name")
    ad.add_argument("--pass-rates", help="records with pass_rate (the output of eval.py passrate): each trace of --data takes "
                                         "its problem's rate by id, so the traces may come from a teacher pool")
    ad.add_argument("--k", type=int, default=8, help="samples behind the pass rates: K + 1 brackets (default: 8)")
    ad.add_argument("--per-bracket", type=int, help="problems per bracket (default: the largest balanced count)")
    ad.add_argument("--model", help="tokenizer for traces without a 'length' (hub name, folder or 'tiny')")
    ad.add_argument("--seed", type=int, default=0, help="seed of the per-bracket subsampling (default: 0)")
    ad.add_argument("--out", required=True, help="output .jsonl or .parquet (the cold-start data)")
    ad.add_argument("--overwrite", action="store_true", help="replace --out (and its images) if it exists")

    demo = sub.add_parser("demo", help="write the offline demo task: sft, pool, pool_traces, rl and test .jsonl, and their images")
    demo.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace the demo already in --out (its images/ and "
                                                               ".jsonl files; other files there stay)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--sft", type=int, default=3000, help="warm-up records, one trace each (default: 3000)")
    demo.add_argument("--pool", type=int, default=1200, help="pool problems: pass rates, AdaCS's teacher traces (default: 1200)")
    demo.add_argument("--rl", type=int, default=1000, help="AEPO prompts (default: 1000)")
    demo.add_argument("--test", type=int, default=300, help="held-out records (default: 300)")
    return parser


def check_split_flags(data: str | list[str] | None, **flags):
    """Stop on a --split or --config (`flags`: name -> value, empty or None where not given) for a --data that is one
    .jsonl, .json or .parquet file (every --data, where several are given): the file is read whole, with no splits
    or configurations, so the flag would be ignored."""
    files = [data] if isinstance(data, str) or data is None else data
    for flag, value in flags.items():
        if value and files and all(Path(d or "").suffix in RECORD_SUFFIXES for d in files):
            raise SystemExit(f"--{flag} {value}: --data {files[0]} is one file, without {flag}s: leave --{flag} out")


def check_args(args):
    """The subcommands' numbers and paths, one line naming the first bad flag, before anything is read or written."""
    counts = {"convert": ["limit"], "adacs": ["k", "per_bracket"], "demo": ["sft", "pool", "rl", "test"]}[args.command]
    for name in counts:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= getattr(args, "seed", 0) < 2**32:  # as ares.py's and eval.py's --seed
        raise SystemExit(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.command == "adacs" and args.k > MAX_K:  # run_adacs lists every one of the K + 1 brackets
        raise SystemExit(f"--k must be <= {MAX_K} (the samples per problem behind the pass rates), got {args.k}")
    check_split_flags(getattr(args, "data", None), split=getattr(args, "split", None),
                      config=getattr(args, "config", None))  # read_rows reads a file whole: the flag would do nothing
    if args.command == "demo":
        check_demo_out(args.out, args.overwrite)
    else:
        check_records_out(args.out, {flag: getattr(args, flag[2:].replace("-", "_"), None)
                                     for flag in ("--data", "--pass-rates")}, args.overwrite)
    model = Path(args.model).expanduser() if args.command == "adacs" and args.model else None
    if model and args.model != "tiny" and (model.exists() or str(model).startswith((".", "/", "~"))):
        if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):  # a run folder, an adapter
            raise SystemExit(f"--model {args.model}: " + ("no such folder" if not model.exists() else "no tokenizer "
                             "there (tokenizer.json)") + "; give a checkpoint folder (e.g. runs/x/final) or a hub name")
    elif model and args.model != "tiny":  # a hub name (runs/x looks like one): its tokenizer must load, now
        try:
            tokenizer_for(args.model)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--model {args.model}: no such folder, and no tokenizer of that name on the hub (or in its "
                             f"cache, offline): {str(e).splitlines()[0][:160]}") from None


def check_records_out(out: str, inputs: dict, overwrite: bool):
    """--out of a command that writes records (convert, adacs, eval.py passrate): a new .jsonl or .parquet file (or one
    --overwrite replaces), none of the `inputs` ({flag: path}), outside any training run, whose images folder is its
    own, and writable. One line naming the first problem, before anything is read."""
    path = Path(out)
    for flag, given in inputs.items():  # the output is written over its target: never over an input
        if given and Path(given).expanduser().resolve() == path.expanduser().resolve():
            raise SystemExit(f"--out {out}: the same file as {flag}; give another output file")
    if path.is_dir():
        raise SystemExit(f"--out {out}: a folder; give the output file (.jsonl or .parquet)")
    if path.suffix not in RECORD_SUFFIXES:  # what record_rows reads
        raise SystemExit(f"--out {out}: give a .jsonl or .parquet file (no stage reads "
                         f"{f'a *{path.suffix} file' if path.suffix else 'a file without a suffix'})")
    check_outside_runs("--out", out)
    check_new_output("--out", out, overwrite)
    folder = images_folder(path)
    if folder.is_dir():  # write_records replaces it whole
        shared = next((p for p in map(path.with_suffix, RECORD_SUFFIXES) if p != path and p.exists()), None)
        theirs = next((p for p in folder.iterdir() if not re.fullmatch(r"\d{7,}_\d+\.png", p.name)), None)
        if shared or theirs:  # shared's records would show the new images; a user's own images would be gone
            raise SystemExit(f"--out {out}: its images go to {folder}, " + (
                f"where {shared} keeps its own" if shared else f"which holds {theirs.name}, not written by convert or "
                "adacs") + ": give --out another name")
    check_writable("--out", out, folder=False)


def check_demo_out(out: str, overwrite: bool):
    """demo's --out: a folder outside any training run, holding no file of the user's where the demo writes its own
    (not_the_demos), nor an earlier demo unless --overwrite; writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--out {out}: a file, not a folder")
    theirs = not_the_demos(path) if path.is_dir() else None
    if theirs:  # make_demo replaces images/ and its .jsonl files whole
        raise SystemExit(f"--out {out}: {theirs} is not the demo's, and the demo replaces images/ and its .jsonl "
                         "files there: give a new folder")
    check_outside_runs("--out", out)
    there = [f"{name}.jsonl" for name in DEMO_FILES if (path / f"{name}.jsonl").exists()]
    there += ["images/"] if (path / "images").is_dir() else []
    if there:
        check_new_output("--out", out, overwrite, holds=f"a demo ({', '.join(there)})")
    check_writable("--out", out)


DISK_ERRORS = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EROFS: "make it writable",
               errno.EACCES: "make it writable"}  # a full disk or quota, a read-only or forbidden folder


def disk_failure(e: OSError, again: str) -> str | None:
    """The one line for a write that a full disk, a quota or a read-only or forbidden folder stopped midway (every
    output is written whole or not at all, so what was written before stands), else None."""
    if e.errno not in DISK_ERRORS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror}: the outputs written before are whole; {DISK_ERRORS[e.errno]}, then {again}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = command_parser()
    args = parser.parse_args(argv)
    expand_home(vars(args), ("out", "data", "pass_rates", "model"))
    if args.command == "convert" and not (args.data or args.preset):
        parser.error("convert needs --data or --preset")
    check_args(args)
    # what to run again after a stop: a demo stopped between its files leaves some in --out, which the same command
    # then refuses without --overwrite (check_new_output)
    again = lambda: "the same command" + (" with --overwrite" if Path(args.out).exists() and not args.overwrite  # noqa
                                          else "")
    try:
        return {"convert": run_convert, "adacs": run_adacs, "demo": run_demo}[args.command](args)
    except KeyboardInterrupt:  # one line and the shell's code, as ares.py and eval.py (it was a traceback, exit -2)
        held = ("holds whole files only, each the one it held before or one this command wrote before the stop"
                if args.command == "demo" else "holds what it held before or nothing")  # a demo is many files
        print(f"\ninterrupted (Ctrl-C): {args.out} {held} (every output is written whole, then renamed into place); "
              f"{again()} writes it", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    except OSError as e:
        if e.errno in DISK_ERRORS and not e.filename:  # an image written before the records: the output it is for
            e.filename = args.out
        line = disk_failure(e, f"{again()} writes them again")
        if line is None:
            raise
        raise SystemExit(line) from None


if __name__ == "__main__":
    main()
