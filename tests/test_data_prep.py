"""data_prep.py: convert (presets, the generic mapping, bad rows), passrate, AdaCS curation and the demo task.

Each test checks against something computed independently of the code under test: values worked out by hand
in the test, pixels read back from the written PNGs, or a second run with another number of processes."""
import importlib
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import ares
import data_prep
from conftest import run_script

ev = importlib.import_module("eval")  # passrate runs in eval.py; `import eval` would shadow the builtin

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (200, 10, 10), (10, 10, 200)


def png(colour, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def pixels(img) -> np.ndarray:
    """An image (PIL or a path) as an RGB array."""
    if isinstance(img, (str, Path)):
        with Image.open(img) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(img.convert("RGB"))


def solid(img, colour) -> bool:
    return bool((pixels(img) == np.array(colour)).all())


def parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------------
# convert: presets. Each mock row has the columns of that dataset's card (PRESETS[...]["confirmed"]).

MV_COT = ("According to the question shown in the image, please first conduct reasoning, and then answer the "
          "question and provide the correct option letter, e.g., A, B, C, D, at the end.")


def preset_case(name: str, tmp: Path):
    """(data file, expected records as {field: value}) for a mock of the preset's dataset."""
    img = {"bytes": png(RED), "path": None}
    if name == "virl39k":
        (tmp / "images").mkdir()
        Image.new("RGB", (8, 6), RED).save(tmp / "images" / "q1-0.png")
        rows = [dict(question="<image>What is the area of the shaded region?", answer="\\boxed{12}",
                     PassRate_32BTrained=0.5, PassRate_7BBase=0.25, category="(GradeSchool) Geometric",
                     source="MMK12", qid="q1", image=["images/q1-0.png"])]
        return parquet(tmp / "39Krelease.parquet", rows), [dict(
            id="q1", question="What is the area of the shaded region?", answer="12", source="MMK12",
            images=[str((tmp / "images" / "q1-0.png").resolve())], category="(GradeSchool) Geometric",
            PassRate_7BBase=0.25)]
    if name == "geometry3k":
        rows = [dict(images=[img], problem="<image>Find x.", answer="3", id=7, choices=["1", "3", "5", "7"],
                     ground_truth="B")]
        return parquet(tmp / "geo.parquet", rows), [dict(id="7", question="Find x.", answer="3", n_images=1)]
    if name == "mathvista-testmini":
        meta = dict(category="math-targeted-vqa", context="bar chart", grade="daily life", img_height=6, img_width=8,
                    language="english", skills=["statistical reasoning"], source="FigureQA", split="testmini",
                    task="figure question answering")
        rows = [dict(pid="1", question="Which bar is the tallest?", image="images/1.jpg", decoded_image=img,
                     choices=["red", "blue", "green"], unit=None, precision=None, answer="blue",
                     question_type="multi_choice", answer_type="text", metadata=meta, query="Hint: ..."),
                dict(pid="2", question="What is the value of the red bar?", image="images/2.jpg", decoded_image=img,
                     choices=None, unit=None, precision=1.0, answer="1.5", question_type="free_form",
                     answer_type="float", metadata=meta, query="Hint: ...")]
        return parquet(tmp / "mathvista.parquet", rows), [
            dict(id="1", question="Which bar is the tallest?\nChoices:\n(A) red\n(B) blue\n(C) green", answer="B",
                 choices=["red", "blue", "green"], n_images=1, question_type="multi_choice"),  # the grader reads both
            dict(id="2", question="What is the value of the red bar?", answer="1.5", precision=1.0, n_images=1)]
    if name.startswith("mathverse"):
        meta = dict(split="testmini", source="GeoQA", subject="Plane Geometry", subfield="Angle")
        common = dict(problem_index="1", image=img, answer="A", question_type="multi-choice", metadata=meta,
                      query_wo="...", question_for_eval="...")
        rows = [dict(common, sample_index="1", problem_version="Vision Only", question="", query_cot=MV_COT),
                dict(common, sample_index="2", problem_version="Text Dominant", question="As shown, find the angle.",
                     query_cot=MV_COT + "\nQuestion: As shown, find the angle.\nChoices:\nA:30°\nB:60°")]
        expect = [dict(id="1", question=MV_COT, answer="A", n_images=1, problem_version="Vision Only")]
        if name == "mathverse-testmini":
            expect.append(dict(id="2", question=rows[1]["query_cot"], answer="A", problem_version="Text Dominant"))
        return parquet(tmp / "testmini.parquet", rows), expect
    if name == "mathvision":
        rows = [dict(id="5", question="<image1>\nWhich shape comes next?", options=["A", "B", "C", "D", "E"],
                     image="images/5.jpg", decoded_image=img, answer="C", solution=None, level=2, subject="logic"),
                dict(id="6", question="How many dots are there? <image1>", options=[], image="images/6.jpg",
                     decoded_image=img, answer="12", solution=None, level=1, subject="counting")]
        return parquet(tmp / "mathvision.parquet", rows), [
            dict(id="5", question="Which shape comes next?\nChoices:\n(A) A\n(B) B\n(C) C\n(D) D\n(E) E", answer="C",
                 choices=list("ABCDE"), level=2, subject="logic", n_images=1),
            dict(id="6", question="How many dots are there?", answer="12", level=1)]
    if name == "math500":
        rows = [dict(problem="Compute $\\sqrt{16}$.", solution="It is $\\boxed{4}$.", answer="4", subject="Algebra",
                     level=1, unique_id="test/algebra/1.json")]
        return jsonl(tmp / "math500.jsonl", rows), [dict(id="test/algebra/1.json", question="Compute $\\sqrt{16}$.",
                                                          answer="4", level=1, n_images=0)]
    if name == "gsm8k":
        rows = [dict(question="Tom has 1,000 apples and buys 200 more. How many now?",
                     answer="He has 1000 + 200 = <<1000+200=1200>>1200 apples.\n#### 1,200")]
        return jsonl(tmp / "gsm8k.jsonl", rows), [dict(id="gsm8k-0", answer="1200", source="gsm8k", n_images=0)]
    raise KeyError(name)


def local_imports(path: Path) -> set[str]:
    """The repository's own modules that a file imports, at any depth (lazy imports inside functions too)."""
    import ast

    own = {p.stem for p in ROOT.glob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & own


def test_imports_point_one_way():
    """data_prep.py <- ares.py <- eval.py (and bench.py): no file imports one above it, so there is no cycle."""
    assert local_imports(ROOT / "data_prep.py") == set()
    assert local_imports(ROOT / "ares.py") == {"data_prep"}
    assert local_imports(ROOT / "eval.py") == {"ares", "data_prep"}
    assert local_imports(ROOT / "bench.py") <= {"ares", "data_prep"}


def test_data_prep_holds_data_and_verdicts_only():
    """The layout rules (README, "Reading ares.py"): data_prep.py knows nothing of the trainer (no process group,
    checkpoint, tracker, LoRA or model loading, no trainer config), and no file cites a spec a reader cannot open."""
    import re

    code = (ROOT / "data_prep.py").read_text()
    for trainer_only in ("torch.distributed", "ForConditionalGeneration", "save_checkpoint", "peft", "tensorboard", "wandb",
                         "AutoModel", "DistributedDataParallel"):
        assert trainer_only not in code, trainer_only
    assert not re.search(r"\bcfg\.", code)  # plain arguments, never ares.py's Config
    for f in ("ares.py", "data_prep.py", "eval.py", "bench.py"):
        assert "spec §" not in (ROOT / f).read_text().lower(), f
    ares_code = (ROOT / "ares.py").read_text()
    part1 = ares_code[:ares_code.index("# PART 2: THE TRAINER'S INFRASTRUCTURE")]
    for infrastructure in ("def load_model", "def save_checkpoint", "def validate_config", "class Policy", "def main"):
        assert infrastructure not in part1 and infrastructure in ares_code, infrastructure


def test_every_name_in_the_readmes_reading_table_is_defined_where_the_table_puts_it():
    """README "Reading ares.py": each function, class or constant its table names is defined at the top level (or as a
    method) of the file its row gives, in ares.py in the part the row gives (Part 1 above the Part 2 header, Part 2
    below it), and Part 1's rows come in the file's order (the order the algorithm runs). A name renamed, removed or
    moved to the other part fails here, naming it; `convert` is data_prep.py's subcommand, not a function."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Reading `ares.py`"):readme.index("## Choices we made")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| where")]
    texts = {f: (ROOT / f).read_text() for f in ("ares.py", "data_prep.py", "eval.py")}
    part2 = texts["ares.py"].index("# PART 2: THE TRAINER'S INFRASTRUCTURE")
    firsts, named = [], 0
    for where, what, _ in rows:
        f = "ares.py" if where.startswith("Part ") else where.strip("`")
        names = re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", where + " " + what)
        if f == "data_prep.py":
            assert 'add_parser("convert"' in texts[f] and "convert" in names
            names.remove("convert")
        places = []
        for name in names:
            found = re.search(rf"^(?:(?:def|class) {name}\b|{name}\s*[:=]|    def {name}\()", texts[f], re.M)
            assert found, f"README, Reading ares.py: {name} is not defined in {f}"
            if f == "ares.py":
                assert (found.start() < part2) == where.startswith("Part 1"), f"{name} is not in {where.split(':')[0]}"
            places.append(found.start())
        named += len(names)
        if where.startswith("Part 1") and places:
            firsts.append((places[0], where))
    assert firsts == sorted(firsts), firsts  # the rows of Part 1 in the order of the file
    assert named > 100 and len(firsts) == 8, (named, firsts)


def test_every_test_the_readme_cites_is_a_test_of_that_file():
    """The README backs its claims with `tests/<file>.py::<test>` citations (23 of them, many in "Hardware guidance"
    and "Benchmarks"); a test renamed or removed left its citation pointing at nothing, and the claim untested. And
    the test files the README names (with what each checks, in "Reading ares.py") are the test files there are."""
    import re

    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"tests/(test_[a-z_]+\.py)::(test_[a-z0-9_]+)", readme))
    assert len(cited) >= 20, cited
    files = set(re.findall(r"tests/(test_[a-z_]+\.py)", readme))  # "Reading ares.py" lists what each file tests
    assert files == {p.name for p in (ROOT / "tests").glob("test_*.py")}, files
    for file, test in sorted(cited):
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), f"README cites {file}::{test}"


def test_geometry3k_holds_a_decimal_answer_to_its_own_decimals(tmp_path):
    """Geometry3K's decimal answers are its options' rounded values (2.4 for sqrt(6)): their records get a `precision`
    of their decimals, so the grader takes what rounds to them; an integer or an expression stays exact."""
    img = {"bytes": png(RED), "path": None}
    rows = [dict(images=[img], problem="<image>Find x.", answer=a, id=k) for k, a in
            enumerate(["2.4", "15.60", "3", "2\\sqrt{6}"])]
    recs = data_prep.load_source(str(parquet(tmp_path / "geo.parquet", rows)), preset="geometry3k")
    assert [r.get("precision") for r in recs] == [1, 2, None, None]
    golds = [data_prep.gold_of(r) for r in recs]
    assert data_prep.is_correct("\\sqrt{6}", golds[0]) and data_prep.is_correct("15.6", golds[1])
    assert not data_prep.is_correct("2.5", golds[0]) and not data_prep.is_correct("3.4", golds[2])
    assert data_prep.gold_of(dict(id="1", answer="2.4")).precision is None  # other data: exact


@pytest.mark.parametrize("name", sorted(data_prep.PRESETS))
def test_preset_maps_a_mock_row_shaped_like_its_card(name, tmp_path):
    path, expected = preset_case(name, tmp_path)
    records = data_prep.load_source(str(path), preset=name)
    assert len(records) == len(expected)
    for rec, want in zip(records, expected):
        n_images = want.pop("n_images", None)
        assert {k: rec[k] for k in want} == want
        if n_images is not None:
            assert len(rec["images"]) == n_images
        for img in rec["images"]:
            assert solid(img, RED)
        assert rec["response"] is None and rec["pass_rate"] is None


def test_every_preset_names_its_source_and_a_hub_split():
    for name, spec in data_prep.PRESETS.items():
        assert spec["confirmed"] and spec["notes"] and spec["hub"] and spec["split"], name
        source, *_, split, config, label = data_prep.resolve(name, None, None, None, None)  # a preset name as source
        assert (source, split, config, label) == (spec["hub"], spec["split"], spec["config"], name)


def test_a_preset_added_as_the_readme_says_works_in_every_command(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """README (forking: a dataset): a new PRESETS entry needs a hub name, a split and a mapping. One without `notes`
    broke every data_prep.py command (the convert help listed each preset's notes), `demo` included. And ares.py
    trains on a copy of its data with --preset yourname (its columns mapped: the hook sees our field names)."""
    monkeypatch.setitem(data_prep.PRESETS, "yourname", dict(hub="org/name", split="train",
                                                             mapping=dict(question="problem", answer="solution")))
    with pytest.raises(SystemExit) as err:
        data_prep.main(["convert", "--help"])
    assert err.value.code == 0 and "yourname" in capsys.readouterr().out
    path = jsonl(tmp_path / "theirs.jsonl", [dict(problem="What is 2 + 2?", solution="4")])
    data_prep.main(["convert", "--data", str(path), "--preset", "yourname", "--out", str(tmp_path / "ours.jsonl")])
    [rec] = [json.loads(line) for line in open(tmp_path / "ours.jsonl")]
    assert (rec["question"], rec["answer"]) == ("What is 2 + 2?", "4")
    path = jsonl(tmp_path / "theirs.jsonl", [dict(problem=f"What is {k} + 2?", solution=str(k + 2)) for k in range(2)])
    (tmp_path / "hook.py").write_text("def score(record, response):\n    with open(__file__ + '.log', 'a') as f:\n"
                                      "        f.write(record['question'] + '=' + record['answer'] + '\\n')\n"
                                      "    return 0.0\n")
    ares.main(["--stage", "aepo", "--model", str(tiny_ckpt), "--data", str(path), "--preset", "yourname", "--out",
               str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--group-size", "2", "--max-response-len",
               "8", "--keep-uniform-groups", "--reward-fn", f"{tmp_path / 'hook.py'}:score"])
    graded = (tmp_path / "hook.py.log").read_text().splitlines()
    assert sorted(set(graded)) == ["What is 0 + 2?=2", "What is 1 + 2?=3"] and len(graded) == 4


# ----------------------------------------------------------------------------------------------------------
# convert: the generic mapping, every shape of image column, the CLI, and bad rows.


def test_generic_mapping_reads_image_lists_single_paths_bytes_and_dicts(tmp_path):
    Image.new("RGB", (8, 6), RED).save(tmp_path / "red.png")
    Image.new("RGB", (8, 6), BLUE).save(tmp_path / "blue.png")
    paths = jsonl(tmp_path / "paths.jsonl", [
        dict(q="Two images <image><image>", a="\\boxed{5}", pics=["red.png", str(tmp_path / "blue.png")]),
        dict(q="One image", a=6, pics="blue.png"),
        dict(q="No image", a="x", pics=None)])
    cols = dict(question="q", answer="a", images="pics")
    recs = data_prep.load_source(str(paths), mapping=cols)
    assert [r["question"] for r in recs] == ["Two images", "One image", "No image"]
    assert [r["answer"] for r in recs] == ["5", "6", "x"]
    assert [len(r["images"]) for r in recs] == [2, 1, 0]
    assert all(Path(p).is_absolute() for r in recs for p in r["images"])
    assert solid(recs[0]["images"][0], RED) and solid(recs[0]["images"][1], BLUE) and solid(recs[1]["images"][0], BLUE)
    assert [r["id"] for r in recs] == ["paths-0", "paths-1", "paths-2"] and {r["source"] for r in recs} == {"paths"}

    raw = parquet(tmp_path / "bytes.parquet", [dict(q="Q", a="1", img=png(BLUE))])
    (rec,) = data_prep.load_source(str(raw), mapping=dict(question="q", answer="a", images="img"))
    assert isinstance(rec["images"][0], Image.Image) and solid(rec["images"][0], BLUE)

    dicts = parquet(tmp_path / "dicts.parquet", [dict(q="Q", a="1", imgs=[{"bytes": png(RED), "path": "r.png"},
                                                                         {"bytes": None, "path": "blue.png"}])])
    (rec,) = data_prep.load_source(str(dicts), mapping=dict(question="q", answer="a", images="imgs"))
    assert solid(rec["images"][0], RED) and solid(rec["images"][1], BLUE)


def test_saved_dataset_folder_with_image_objects_and_rendered_choices(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["Which colour?"], "answer": ["blue"], "opts": [["red", "blue"]],
                                     "image": [Image.new("RGB", (8, 6), BLUE)], "level": [3]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    (rec,) = data_prep.load_source(str(tmp_path / "saved"), mapping=dict(images="image", choices="opts"))
    assert rec["question"] == "Which colour?\nChoices:\n(A) red\n(B) blue" and rec["answer"] == "B"
    assert solid(rec["images"][0], BLUE) and rec["level"] == 3
    # A saved DatasetDict reads train unless --split names another, as a hub name does (it asked for --split)
    splits = {name: datasets.Dataset.from_dict({"question": [f"{name}?"], "answer": ["1"]}) for name in ("test", "train")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    assert [r["question"] for r in data_prep.load_source(str(tmp_path / "dict"))] == ["train?"]
    assert [r["question"] for r in data_prep.load_source(str(tmp_path / "dict"), split="test")] == ["test?"]
    datasets.DatasetDict(dict(a=splits["test"], b=splits["train"])).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(data_prep.DataError, match=r"no split 'train' \(it has a, b\); pass --split"):
        data_prep.load_source(str(tmp_path / "ab"))


def test_convert_cli_writes_records_ares_loads_with_the_same_pixels(tmp_path):
    Image.new("RGB", (8, 6), RED).save(tmp_path / "red.png")
    src = parquet(tmp_path / "in.parquet", [dict(prompt="<image>Q1", sol="\\boxed{2}", img=png(BLUE), uid="a", trace="t"),
                                            dict(prompt="Q2", sol="3", img=png(RED), uid="b", trace="u")])
    for out in (tmp_path / "out" / "c.jsonl", tmp_path / "out" / "d.parquet"):  # c.parquet would share c_images/
        data_prep.main(["convert", "--data", str(src), "--question-col", "prompt", "--answer-col", "sol",
                        "--image-col", "img", "--id-col", "uid", "--response-col", "trace", "--source", "mine",
                        "--out", str(out)])
        recs = data_prep.load_records(str(out), need_response=True)
        assert [(r["id"], r["question"], r["answer"], r["response"], r["source"]) for r in recs] == [
            ("a", "Q1", "2", "t", "mine"), ("b", "Q2", "3", "u", "mine")]
        assert solid(recs[0]["images"][0], BLUE) and solid(recs[1]["images"][0], RED)
        stored = json.loads(out.read_text().splitlines()[0])["images"] if out.suffix == ".jsonl" else \
            pq.read_table(out).to_pylist()[0]["images"]
        assert stored == [f"{out.stem}_images/0000000_0.png"] and (out.parent / stored[0]).is_file()


def test_a_training_stage_reads_records_from_parquet_with_encoded_images(tmp_path, tiny_ckpt):
    """README (data format): every stage reads our records from Parquet too, an image given as encoded bytes, a
    {bytes, path} object or a {path} object (relative to the data file), or none. The cold start trains a step on
    them, each image its own pixels."""
    Image.new("RGB", (28, 28), BLUE).save(tmp_path / "blue.png")
    rows = [dict(id="a", question="Q1", answer="1", response="\\boxed{1}",
                 images=[{"bytes": png(RED, (28, 28)), "path": None}]),  # encoded, as Parquet stores an image
            dict(id="b", question="Q2", answer="2", response="\\boxed{2}",
                 images=[{"bytes": None, "path": "blue.png"}]),  # a path, beside the data file
            dict(id="c", question="Q3", answer="3", response="\\boxed{3}", images=[])]
    data = parquet(tmp_path / "d.parquet", rows)
    encoded = parquet(tmp_path / "e.parquet", [dict(rows[0], id="e", images=[png(BLUE, (28, 28))])])
    recs = data_prep.load_records(str(data), need_response=True) + data_prep.load_records(str(encoded))
    assert [r["id"] for r in recs] == ["a", "b", "c", "e"] and recs[2]["images"] == []
    colours = [RED, BLUE, None, BLUE]
    assert all(solid(data_prep.open_image(r["images"][0]), c) for r, c in zip(recs, colours) if c)
    out = tmp_path / "run"
    ares.main(["--stage", "coldstart", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(out),
               "--steps", "1", "--batch-size", "3", "--micro-batch-size", "3"])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


BAD_ROWS = [  # (rows, mapping, message)
    ([dict(q="ok", a="1"), dict(q="fine", b="2")], dict(question="q", answer="a"), "row 1.*no column 'a'"),
    ([dict(question="ok", answer="1"), dict(question="Q", answer="  ")], None, "row 1.*empty answer"),
    ([dict(question="<image>", answer="1")], None, "row 0.*empty question"),
    ([dict(question="Q", answer="1", images=["missing.png"])], None, "row 0.*image 0 .*missing.png.*cannot be read"),
    ([dict(question="Q", answer="1", pass_rate=1.5)], None, "row 0.*pass_rate"),
    ([dict(question="Q", answer="purple", choices=["red", "blue"])], dict(choices="choices"), "row 0.*neither an option"),
    ([dict(id="x", question="Q", answer="1"), dict(id="x", question="R", answer="2")], None, "share the id 'x'"),
]


@pytest.mark.parametrize("rows,mapping,message", BAD_ROWS)
def test_bad_rows_name_the_source_and_row(rows, mapping, message, tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(data_prep.DataError, match=message) as err:
        data_prep.load_source(str(path), mapping=mapping)
    assert str(path) in str(err.value)


def test_undecodable_image_bytes_and_the_cli_error(tmp_path):
    path = parquet(tmp_path / "bad.parquet", [dict(question="Q", answer="1", images=[b"not an image"])])
    with pytest.raises(data_prep.DataError, match=r"bad.parquet: row 0 \(id bad-0\): image 0 \(12 bytes\) cannot be read"):
        data_prep.load_source(str(path))
    with pytest.raises(SystemExit, match="data error: .*image 0"):
        data_prep.main(["convert", "--data", str(path), "--out", str(tmp_path / "o.jsonl")])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_transparent_image_is_laid_on_white_as_the_models_own_processor_does(mode, tmp_path, tiny):
    """A black drawing on a transparent background (MathVista has such PNGs) became an all-black image: the alpha was
    dropped and the hidden colour, black, kept. Each pixel must be colour * a + white * (1 - a), worked out here by
    hand, in what the model is given (the records' prompts as the trainer and eval.py encode them)."""
    rgba = np.zeros((28, 28, 4), np.uint8)  # transparent black everywhere
    rgba[4:24, 12:16] = (0, 0, 0, 255)  # an opaque black stroke
    rgba[4:8, 20:24] = (200, 0, 0, 128) if mode == "RGBA" else (0, 0, 0, 255)
    im = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    if mode == "P":  # a palette with one transparent entry, as PNG optimisers write
        im = Image.fromarray(rgba[..., 3] // 255, "P")
        im.putpalette([255, 0, 255, 0, 0, 0] + [0] * 762)  # index 0: magenta, hidden; 1: black
        im.info["transparency"] = 0
    im.save(tmp_path / "drawing.png")
    rgba = np.asarray(Image.open(tmp_path / "drawing.png").convert("RGBA")).astype(float)
    a = rgba[..., 3:] / 255
    want = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)  # (28, 28, 3), by hand
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(id="r", question="What is drawn?", answer="1",
                                                      images=["drawing.png"])) + "\n")
    records = data_prep.load_records(str(tmp_path / "r.jsonl"))
    got = np.asarray(data_prep.open_image(records[0]["images"][0]))
    assert np.abs(got.astype(int) - want).max() <= 1 and got[0, 0].tolist() == [255, 255, 255]
    _, processor = tiny
    (enc,) = data_prep.encode_prompts(processor, records)
    ref = processor(text=[data_prep.prompt_text(processor, records[0])], images=[Image.fromarray(want)])
    assert torch.allclose(enc["pixel_values"], torch.from_numpy(ref["pixel_values"]), atol=0.05)


class Killed(Exception):
    pass


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tool", ["demo", "convert"])
@pytest.mark.parametrize("kill", ["while it draws the images", "while it puts them in place"])
def test_a_rewrite_killed_midway_leaves_no_record_on_another_records_image(kill, tool, tmp_path, monkeypatch):
    """`data_prep.py demo` again into the same folder (another seed), killed while it replaced the images one by one,
    left the earlier run's records beside the new images: 128 of 156 rewritten pool records then had another problem's
    answer. Now a kill while the new images are drawn leaves the earlier output as it was, every byte; a kill while
    they are put in place leaves no records at all (never records beside another record's image). convert the same."""
    out = tmp_path / "demo"
    sizes = dict(sft=6, pool=6, rl=6, test=6)
    data_prep.make_demo(out, seed=0, sizes=sizes)
    src = tmp_path / "src.jsonl"
    other = data_prep.make_demo(tmp_path / "other", seed=1, sizes=sizes)["rl"]  # other problems, other images
    src.write_text(Path(other).read_text().replace('"images/', f'"{tmp_path}/other/images/'))
    if tool == "convert":
        (tmp_path / "first.jsonl").write_text((out / "rl.jsonl").read_text().replace('"images/', f'"{out}/images/'))
        data_prep.main(["convert", "--data", tmp_path / "first.jsonl", "--out", tmp_path / "conv" / "rl.jsonl"])
        out = tmp_path / "conv"
    before = files(out)
    save, rename, calls = Image.Image.save, Path.rename, []

    def dies_on_the_third(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return save(self, *args, **kw)

    def dies_on_the_swap(self, target):
        if Path(target).name.startswith(("images", "rl_images")) and not Path(target).name.endswith(".old"):
            raise Killed  # the earlier records are gone, the earlier images set aside, the new ones not yet in place
        return rename(self, target)

    if kill == "while it draws the images":
        monkeypatch.setattr(Image.Image, "save", dies_on_the_third)
    else:
        monkeypatch.setattr(Path, "rename", dies_on_the_swap)
    with pytest.raises(Killed):
        if tool == "demo":
            data_prep.make_demo(out, seed=1, sizes=sizes)
        else:
            data_prep.main(["convert", "--data", src, "--out", out / "rl.jsonl", "--overwrite"])
    after = files(out)
    if kill == "while it draws the images":
        assert after == before
    else:
        assert not [name for name in after if name.endswith(".jsonl")]


def test_convert_never_gives_another_files_records_new_images(tmp_path):
    """x.jsonl and x.parquet keep their images in the same x_images/: converting b to x.parquet after a to x.jsonl
    replaced the folder, and x.jsonl's record 'What colour? red' was then shown b's blue picture (with --limit, its
    other records named images that were gone). Now the second convert stops with one line naming --out and the file
    that shares the folder, before it reads anything, and every file is left as it was."""
    Image.new("RGB", (8, 6), RED).save(tmp_path / "red.png")
    Image.new("RGB", (8, 6), BLUE).save(tmp_path / "blue.png")
    a = jsonl(tmp_path / "a.jsonl", [dict(id="a", question="What colour?", answer="red", images=["red.png"])])
    b = jsonl(tmp_path / "b.jsonl", [dict(id="b", question="What colour?", answer="blue", images=["blue.png"])])
    data_prep.main(["convert", "--data", a, "--out", tmp_path / "x.jsonl"])
    pool = jsonl(tmp_path / "pool.jsonl", [dict(id="b", question="What colour?", answer="blue", images=["blue.png"],
                                                response="\\boxed{blue}", correct=True, length=3, pass_rate=1.0)])
    before = files(tmp_path)
    for command, name in ((["convert", "--data", b], "x.parquet"), (["adacs", "--data", pool, "--k", "1"], "x.json")):
        with pytest.raises(SystemExit) as err:  # README (run folders): convert or adacs, into x.parquet or x.json
            data_prep.main([*command, "--out", tmp_path / name])
        assert str(err.value.code) == (f"--out {tmp_path / name}: its images go to {tmp_path / 'x_images'}, where "
                                       f"{tmp_path / 'x.jsonl'} keeps its own: give --out another name")
        assert files(tmp_path) == before
    assert solid(data_prep.load_records(str(tmp_path / "x.jsonl"))[0]["images"][0], RED)
    for stem, first, then in (("y", ".parquet", ".jsonl"), ("z", ".json", ".parquet")):  # each kind may be the first
        data_prep.main(["convert", "--data", a, "--out", tmp_path / f"{stem}{first}"])
        before = files(tmp_path)
        with pytest.raises(SystemExit) as err:
            data_prep.main(["convert", "--data", b, "--out", tmp_path / f"{stem}{then}"])
        assert str(err.value.code).endswith(f"where {tmp_path / (stem + first)} keeps its own: give --out another name")
        assert files(tmp_path) == before


def test_convert_never_deletes_a_folder_of_the_users_own_images(tmp_path):
    """convert --out geo.jsonl writes its images to geo_images/, replacing the folder whole: where the user's own images
    were (raw.jsonl's diagram1.png), they were deleted without a word. Now it stops with one line, before anything is
    read; into a geo_images/ that convert wrote it goes on, as a rewrite."""
    (tmp_path / "geo_images").mkdir()
    Image.new("RGB", (8, 6), RED).save(tmp_path / "geo_images" / "diagram1.png")
    raw = jsonl(tmp_path / "raw.jsonl", [dict(id="g", question="Q", answer="1", images=["geo_images/diagram1.png"])])
    before = files(tmp_path)
    with pytest.raises(SystemExit) as err:
        data_prep.main(["convert", "--data", raw, "--out", tmp_path / "geo.jsonl"])
    assert str(err.value.code) == (f"--out {tmp_path / 'geo.jsonl'}: its images go to {tmp_path / 'geo_images'}, which "
                                   "holds diagram1.png, not written by convert or adacs: give --out another name")
    assert files(tmp_path) == before
    data_prep.main(["convert", "--data", raw, "--out", tmp_path / "out.jsonl"])
    data_prep.main(["convert", "--data", raw, "--out", tmp_path / "out.jsonl", "--overwrite"])  # its own folder: rewritten
    assert solid(data_prep.load_records(str(tmp_path / "out.jsonl"))[0]["images"][0], RED)


def records_out_case(command: str, tmp_path: Path) -> list:
    """The argv of `command` (convert, adacs or demo) on a small input of tmp_path, without --out."""
    if command == "demo":
        return ["demo", "--sft", "3", "--pool", "3", "--rl", "3", "--test", "3"]
    rows = [dict(id="b", question="What colour?", answer="blue", response="\\boxed{blue}", correct=True, length=3,
                 pass_rate=1.0)]
    data = jsonl(tmp_path / "in.jsonl", rows)
    return ["convert", "--data", data] if command == "convert" else ["adacs", "--data", data, "--k", "1"]


@pytest.mark.parametrize("command", ["convert", "adacs"])
def test_a_data_and_pass_rates_given_with_a_tilde_are_read_from_the_home_folder(command, tmp_path, monkeypatch):
    """--data=~/in.jsonl and adacs' --pass-rates=~/in.jsonl (a shell expands no ~ after '='), as --out: the checks
    read the home folder's path, but the loader took '~/in.jsonl' for a dataset name ('cannot be read as a
    dataset')."""
    home = tmp_path / "home"
    home.mkdir()
    argv = records_out_case(command, home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    argv = [a if a != home / "in.jsonl" else "~/in.jsonl" for a in argv]
    extra = ["--pass-rates=~/in.jsonl"] if command == "adacs" else []
    data_prep.main([*argv, *extra, "--out=~/out.jsonl"])
    assert [r["id"] for r in map(json.loads, open(home / "out.jsonl"))] == ["b"]


def test_adacs_counts_tokens_with_a_model_given_with_a_tilde_from_the_home_folder(tmp_path, tiny_ckpt, monkeypatch):
    """adacs --model=~/m (a shell expands no ~ after '='), for traces without a 'length': the check read $HOME/m, but
    the tokenizer was looked up as the hub name '~/m'. The count is the tokenizer's of the folder itself."""
    from transformers import AutoTokenizer

    home = tmp_path / "home"
    home.mkdir()
    (home / "m").symlink_to(tiny_ckpt)
    rows = [dict(id="b", question="What colour?", answer="blue", response="so \\boxed{blue}", correct=True,
                 pass_rate=1.0)]
    jsonl(home / "in.jsonl", rows)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    data_prep.main(["adacs", "--data=~/in.jsonl", "--k", "1", "--model=~/m", "--out=~/out.jsonl"])
    (got,) = map(json.loads, open(home / "out.jsonl"))
    tokens = AutoTokenizer.from_pretrained(tiny_ckpt)("so \\boxed{blue}", add_special_tokens=False)["input_ids"]
    assert (got["id"], got["length"]) == ("b", len(tokens))


@pytest.mark.parametrize("command", ["convert", "adacs", "demo"])
def test_an_existing_output_is_replaced_only_with_overwrite(command, tmp_path, monkeypatch):
    """convert, adacs and demo wrote over an --out that was there (an earlier output, the cold-start data a run was
    trained on) without a word. Now, as ares.py with a run in --out, they stop with one line naming the flag and the
    file, before the data is read (nor a tokenizer loaded), and leave it as it was; --overwrite replaces it."""
    out = tmp_path / ("demo" if command == "demo" else "out.jsonl")
    argv = records_out_case(command, tmp_path)
    data_prep.main([*argv, "--out", out])
    before = files(tmp_path)
    with monkeypatch.context() as mp:
        mp.setattr(data_prep, "_load", lambda *a, **k: pytest.fail("read the data"))
        mp.setattr(data_prep, "make_demo", lambda *a, **k: pytest.fail("drew the demo"))
        with pytest.raises(SystemExit) as err:
            data_prep.main([*argv, "--out", out])
    holds = "holds a demo (sft.jsonl, pool.jsonl, pool_traces.jsonl, rl.jsonl, test.jsonl, images/)" if \
        command == "demo" else "exists"
    assert str(err.value.code) == f"--out {out} {holds}: add --overwrite to replace it, or choose another --out"
    assert files(tmp_path) == before
    data_prep.main([*argv, "--out", out, "--overwrite", *(["--seed", "1"] if command == "demo" else [])])
    if command == "demo":  # another seed: other problems, each .jsonl replaced
        assert (out / "rl.jsonl").read_bytes() != before["demo/rl.jsonl"]
    else:
        assert [r["id"] for r in map(json.loads, open(out))] == ["b"]


@pytest.mark.parametrize("command", ["convert", "demo"])
def test_an_out_given_with_a_tilde_is_written_where_its_checks_look(command, tmp_path, monkeypatch):
    """`--out=~/x` reaches data_prep.py with its ~ (a shell expands none after '='). Every check of --out
    (check_new_output, check_outside_runs, check_writable) read it as the home folder's, but the output was written to
    ./~/x: the same command again found no $HOME/x and replaced ./~/x without --overwrite (check_new_output taking the
    path unexpanded passed every test). Now --out is the home folder's, where the checks look, and a second run
    stops."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    name = "demo" if command == "demo" else "sft.jsonl"
    argv = records_out_case(command, tmp_path)
    data_prep.main([*argv, f"--out=~/{name}"])
    assert (home / name).exists() and not (cwd / "~").exists()
    before = files(home)
    with pytest.raises(SystemExit) as err:
        data_prep.main([*argv, f"--out=~/{name}"])
    assert "add --overwrite to replace it" in str(err.value.code) and files(home) == before


@pytest.mark.parametrize("command", ["convert", "adacs", "demo"])
@pytest.mark.parametrize("where", ["in a checkpoint", "in a run folder"])
def test_an_output_inside_a_training_run_is_refused(command, where, tmp_path):
    """convert, adacs and demo wrote into a checkpoint (runs/x/final/, which the run's next save, --keep-last or
    --overwrite replaces whole) or among a run's own files (runs/x, its config.json the run record: runs/x/metrics.jsonl
    is what the run appends to). Now one line naming --out and the folder, with or without --overwrite, and nothing is
    written. Data goes outside a run altogether (eval.py's results may go into a subfolder: test_eval.py)."""
    run = tmp_path / "runs" / "x"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"flags": {"stage": "coldstart"}}))
    (run / "final" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (run / "final" / "COMPLETE").write_text(json.dumps({"step": 2, "files": {}}))
    folder = run / "final" if where == "in a checkpoint" else run
    out = folder / ("demo" if command == "demo" else "metrics.jsonl")
    argv = records_out_case(command, tmp_path)
    before = files(tmp_path)
    for more in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as err:
            data_prep.main([*argv, "--out", out, *more])
        what = ("a checkpoint of a training run, which its next save, --keep-last or --overwrite replaces whole"
                if where == "in a checkpoint" else
                "the folder of a training run (its config.json is ares.py's run record), whose files are the run's")
        assert str(err.value.code) == f"--out {out}: {folder} is {what}: give a folder outside it"
        assert files(tmp_path) == before


def test_only_an_ares_run_record_makes_a_run_of_the_folders_above_a_data_output(tmp_path):
    """check_outside_runs looks at every folder above --out for ares.py's run record, and took any config.json with a
    "flags" key for one: a project folder holding another tool's config.json refused every convert, adacs, demo and
    passrate output anywhere below it (c5c7bf2). Its test went with 02e7e53, and since then run_record_in dropping its
    "stage" check, or check_outside_runs looking at --out's own folder and its parent only (runs/x/data/sft.jsonl
    written inside a run), passed every test. A run record's "flags" hold ares.py's stage; at any depth below one, a
    data output is refused."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "config.json").write_text(json.dumps({"name": "my tool", "flags": ["-O2", "--fast"]}))
    (project / "data" / "config.json").write_text(json.dumps({"flags": {"verbose": True}}))  # flags, but not ares.py's
    out = project / "data" / "sft.jsonl"
    data_prep.main([*records_out_case("convert", tmp_path), "--out", out])
    assert [r["id"] for r in map(json.loads, open(out))] == ["b"]
    data_prep.check_outside_runs("--out", project / "data" / "demo")  # a folder output too
    (project / "config.json").write_text(json.dumps({"flags": {"stage": "aepo", "out": str(project)}}))
    for below in (out, project / "data" / "sub" / "deeper" / "sft.jsonl"):  # ares.py's record is one, at any depth
        with pytest.raises(SystemExit) as err:
            data_prep.check_outside_runs("--out", below)
        assert str(err.value.code) == (f"--out {below}: {project} is the folder of a training run (its config.json is "
                                       "ares.py's run record), whose files are the run's: give a folder outside it")


@pytest.mark.parametrize("values, message", [
    ((3, "hard"), "field 'level' is a number in record a and text in record b: a Parquet column holds one type"),
    ((True, 1), "field 'level' is true or false in record a and a number in record b: a Parquet column holds one type"),
    ((1, 10**20), "record b: field 'level' is 100000000000000000000, past Parquet's 64-bit integers"),
    ((1, 2**63), "record b: field 'level' is 9223372036854775808, past Parquet's 64-bit integers"),  # int64's max + 1
])
def test_convert_to_parquet_names_a_field_parquet_cannot_hold(values, message, tmp_path):
    """JSON lines hold a field that is a number in one record and text in another (`difficulty` may be either), and an
    integer of any size; a Parquet column holds one type of 64 bits at most. convert to .parquet ended in pyarrow's
    ArrowInvalid, ArrowTypeError or OverflowError traceback; now one line names the output, the records and the field,
    and nothing is written. Numbers of both kinds (1 and 0.5) still share a column."""
    data = jsonl(tmp_path / "d.jsonl", [dict(id=rid, question="Q", answer="1", level=v, score=s)
                                       for rid, v, s in zip("ab", values, (1, 0.5))])
    with pytest.raises(SystemExit) as err:
        data_prep.main(["convert", "--data", data, "--out", tmp_path / "d.parquet"])
    assert str(err.value.code).startswith(f"data error: {tmp_path / 'd.parquet'}: {message}"), err.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    ok = jsonl(tmp_path / "ok.jsonl", [dict(id=rid, question="Q", answer="1", score=s, big=b)
                                       for rid, s, b in zip("ab", (1, 0.5), (-2**63, 2**63 - 1))])  # int64's ends
    data_prep.main(["convert", "--data", ok, "--out", tmp_path / "ok.parquet"])
    assert pq.read_table(tmp_path / "ok.parquet").column("score").to_pylist() == [1.0, 0.5]
    assert pq.read_table(tmp_path / "ok.parquet").column("big").to_pylist() == [-2**63, 2**63 - 1]


@pytest.mark.parametrize("escape, lone", [
    ("\\ud83d\\ude00", None),  # an emoji's pair of escapes: one character
    ("\\uD83D\\uDE00", None),  # the same pair, in capitals (JSON takes either)
    ("\\\\ud800", None),  # an escaped backslash, then the text ud800: no escape at all
    ("\\ud800", "d800"), ("\\udc00", "dc00"), ("\\uDFFF", "dfff"),  # half a pair alone: high, low, capitals
    ("\\ude00\\ud83d", "de00"),  # both halves, in the wrong order: two lone halves
])
def test_a_lone_surrogate_escape_is_not_text_and_a_pair_is(escape, lone, tmp_path):
    """A JSON escape of half a UTF-16 pair ("\\ud800") decodes to no character, which the tokenizer and Parquet stop on;
    every reader of records stops on it, naming the line. The cases by hand: the Unicode surrogates are D800-DFFF,
    high ones (D800-DBFF) first in a pair; FILES and TOOL_ROWS try only a lone high one in small letters."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "question": "caf' + escape + '"}\n')
    if lone is None:
        assert [r["id"] for r in data_prep.json_rows(path)] == ["a", "b"]
    else:
        with pytest.raises(data_prep.DataError, match=rf"^{re.escape(str(path))}: line 2: not UTF-8 text \(the escape "
                                                      rf"\\u{lone}: half of a UTF-16 surrogate pair"):
            list(data_prep.json_rows(path))


def test_json_list_files_and_a_broken_json_line(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([dict(question="Q", answer="\\boxed{1}")]))
    assert data_prep.load_source(str(tmp_path / "list.json"))[0]["answer"] == "1"
    (tmp_path / "broken.jsonl").write_text('{"question": "Q", "answer": "1"}\n{"question": \n')
    with pytest.raises(data_prep.DataError, match="broken.jsonl: line 2: not valid JSON"):
        data_prep.load_source(str(tmp_path / "broken.jsonl"))


def corrupt_image_dataset(path: Path) -> Path:
    """A save_to_disk folder whose Image column holds one good image (record a) and bytes that are no image (record b),
    with our column names and geometry3k's (problem, images)."""
    import datasets

    features = datasets.Features(id=datasets.Value("string"), question=datasets.Value("string"),
                                 problem=datasets.Value("string"), answer=datasets.Value("string"),
                                 images=datasets.Sequence(datasets.Image()))
    datasets.Dataset.from_dict(dict(id=["a", "b"], question=["Q1", "Q2"], problem=["Q1", "Q2"], answer=["1", "2"],
                                    images=[[{"bytes": png(RED), "path": None}], [{"bytes": b"garbage", "path": None}]]),
                               features=features).save_to_disk(str(path))
    return path


CONVERT_STOPS = [  # (case, argv, message): {x} are the test's files; each was a traceback, or ran on
    ("a corrupt image in a saved dataset", ["convert", "--data", "{saved}"],  # PIL's UnidentifiedImageError
     "data error: {saved}: row 1 (id b): image 0 (7 bytes) cannot be read: "),
    ("choices an int", ["convert", "--data", "{choices_int}"],  # TypeError: object of type 'int' has no len()
     "data error: {choices_int}: row 0 (id a): the choices (column 'choices') must be a list of options, got 5"),
    ("choices a string", ["convert", "--data", "{choices_str}"],  # split into the options 'A' and 'B'
     'data error: {choices_str}: row 0 (id a): the choices (column \'choices\') must be a list of options, got "AB"'),
    ("--choices-col naming a number", ["convert", "--data", "{good}", "--choices-col", "level"],
     "data error: {good}: row 0 (id a): the choices (column 'level') must be a list of options, got 3"),
    ("--out the same file as --data", ["convert", "--data", "{good}", "--limit", "1", "--out", "{tmp}/./good.jsonl"],
     "--out {tmp}/./good.jsonl: the same file as --data; give another output file"),  # overwrote its input
    ("adacs --out the same file as --pass-rates", ["adacs", "--data", "{good}", "--pass-rates", "{rates}", "--out",
                                                   "{rates}"], "--out {rates}: the same file as --pass-rates"),
    ("a file of another kind", ["convert", "--data", "{csv}"],  # was "Couldn't reach 'd.csv' on the Hub"
     "data error: {csv}: not a .jsonl, .json, .parquet or saved dataset folder"),
    ("adacs, a file of another kind", ["adacs", "--data", "{csv}"],
     "data error: {csv}: not a .jsonl, .json, .parquet or saved dataset folder"),
    ("adacs --k past any K", ["adacs", "--data", "{tmp}/never_read.jsonl", "--k", "99999999999999999999"],  # hung
     "--k must be <= 1024 (the samples per problem behind the pass rates), got 99999999999999999999"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CONVERT_STOPS], ids=[c[0] for c in CONVERT_STOPS])
def test_bad_data_or_flags_stop_convert_and_adacs_with_one_line_before_writing(argv, message, tmp_path):
    """Bad input is one line naming the file, record and field (or the flag), and nothing is written: the inputs are
    left as they were."""
    (tmp_path / "d.csv").write_text("id,question,answer\na,Q,1\n")
    files = dict(tmp=tmp_path, saved=corrupt_image_dataset(tmp_path / "saved"), csv=tmp_path / "d.csv",
                 choices_int=jsonl(tmp_path / "choices_int.jsonl", [dict(id="a", question="Q", answer="1", choices=5)]),
                 choices_str=jsonl(tmp_path / "choices_str.jsonl", [dict(id="a", question="Q", answer="A", choices="AB")]),
                 good=jsonl(tmp_path / "good.jsonl", [dict(id="a", question="Q", answer="1", level=3, response="r")]),
                 rates=jsonl(tmp_path / "rates.jsonl", [dict(id="a", question="Q", answer="1", pass_rate=0.5)]))
    before = {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    argv = [a.format(**files) for a in argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "out.jsonl")])
    with pytest.raises(SystemExit) as err:
        data_prep.main(argv)
    msg = str(err.value.code)
    assert msg.startswith(message.format(**files)) and "\n" not in msg, msg
    assert {p: p.read_bytes() for p in tmp_path.glob("*.jsonl")} == before and not (tmp_path / "out.jsonl").exists()


def test_answers_are_normalised_and_options_rendered_one_way():
    assert data_prep.normalise_answer(" \\boxed{\\frac{1}{2}} ") == "\\frac{1}{2}"
    assert data_prep.normalise_answer("so 2 + 2 = 4.\n#### 12,345,678") == "12345678"
    assert data_prep.normalise_answer(42) == "42"
    assert data_prep.clean_question("<image1> Look at <image 2>  the  figure.") == "Look at the figure."
    assert data_prep.render_choices("Pick.", ["1", " 2 "]) == "Pick.\nChoices:\n(A) 1\n(B) 2"
    assert [data_prep.choice_letter(a, ["x", "y", "z"]) for a in ("y", "(C)", "b.", "D", "w")] == ["B", "C", "B", None, None]


# ----------------------------------------------------------------------------------------------------------
# adacs on a hand-built pool (K = 4: brackets p = 0, 1/4, 1/2, 3/4, 1).
#   source a: L(0) = median of a0, a1, a2's traces [100, 140, 120, 160, 200, 90, 130] = 130
#             L(1) = median of a3, a4's traces [40, 60, 50, 30] = 45
#             targets: p=0 -> 130, p=1/4 -> 108.75, p=1/2 -> 87.5, p=1 -> 45
#   source b: no p = 1 problem, so L(1) comes from its highest bracket, p = 1/2: median of
#             [200, 260, 220, 240, 270, 290] = 250; L(0) = median [300, 320] = 310; target(1/2) = 280

POOL = {  # id: (source, pass rate, [(length, correct), ...])
    "a0": ("a", 0.0, [(100, False), (140, False)]),
    "a1": ("a", 0.0, [(120, False), (160, False)]),
    "a2": ("a", 0.0, [(200, True), (90, True), (130, False)]),     # target 130: 90 (|40|) beats 200; the exact 130 is wrong
    "a3": ("a", 1.0, [(40, True), (60, True)]),                    # target 45: 40
    "a4": ("a", 1.0, [(50, True), (30, True)]),                    # target 45: 50
    "a5": ("a", 0.5, [(80, True), (100, True), (88, False)]),      # target 87.5: 80; the nearer 88 is wrong
    "a6": ("a", 0.25, [(110, True), (95, True), (108, False)]),    # target 108.75: 110
    "b0": ("b", 0.0, [(300, False), (320, False)]),
    "b1": ("b", 0.5, [(200, True), (260, True)]),                  # target 280: 260
    "b2": ("b", 0.5, [(220, True), (240, None)]),                  # 240 has no flag: graded wrong on the fly
    "b3": ("b", 0.5, [(290, True), (270, True)]),                  # a tie at 10 tokens: the shorter, 270
}
CHOSEN = {"a2": 90, "a3": 40, "a4": 50, "a5": 80, "a6": 110, "b1": 260, "b2": 220, "b3": 270}
BRACKET = {"a2": 0, "a6": 1, "a5": 2, "b1": 2, "b2": 2, "b3": 2, "a3": 4, "a4": 4}


def pool_records() -> list[dict]:
    out = []
    for pid, (src, p, traces) in POOL.items():
        for length, correct in traces:
            boxed = "7" if correct else "5"
            out.append(dict(id=pid, question=f"q {pid}", answer="7", images=[], source=src, pass_rate=p, length=length,
                            response=f"<think>{pid} {length}</think> \\boxed{{{boxed}}}", correct=correct))
    return out


def test_adacs_anchors_targets_and_chosen_traces_match_the_hand_computation():
    chosen, st = data_prep.adacs_curate(pool_records(), k=4, per_bracket=100)
    assert {s: a[:2] for s, a in st["anchors"].items()} == {"a": (130, 45), "b": (310, 250)}
    assert {s: a[2:] for s, a in st["anchors"].items()} == {"a": (0, 4), "b": (0, 2)}  # b's L(1) from p = 1/2
    assert {r["id"]: r["length"] for r in chosen} == CHOSEN
    targets = {r["id"]: r["target_length"] for r in chosen}
    assert targets == {"a2": 130, "a3": 45, "a4": 45, "a5": 87.5, "a6": 108.75, "b1": 280, "b2": 280, "b3": 280}
    assert all(r["correct"] for r in chosen) and "boxed{7}" in chosen[0]["response"]
    assert st["dropped"] == {"a": 2, "b": 1}  # a0, a1, b0: no correct trace
    assert st["selected"] == {0: 1, 1: 1, 2: 4, 4: 2}


@pytest.mark.parametrize("per_bracket,counts", [(None, {0: 1, 1: 1, 2: 1, 4: 1}), (2, {0: 1, 1: 1, 2: 2, 4: 2})])
def test_adacs_keeps_equal_counts_per_bracket(per_bracket, counts):
    chosen, st = data_prep.adacs_curate(pool_records(), k=4, per_bracket=per_bracket, seed=3)
    assert Counter(BRACKET[r["id"]] for r in chosen) == counts  # default: the smallest non-empty bracket, 1
    assert all(CHOSEN[r["id"]] == r["length"] for r in chosen)  # a subset of the length-matched choices
    assert {b: n for b, (n, _) in st["after"].items()} == counts


@pytest.mark.parametrize("k,rate,anchors,lengths,want", [
    # L(0) = 1000, L(1) = 20: L_target(3/8) = 5/8 1000 + 3/8 20 = 632.5, so 634 (1.5 away), not 628 (4.5). A rate
    # written rounded, 0.38, is read as 3/8 (check_pass_rates): its target is 3/8's, not 0.62 1000 + 0.38 20 = 627.6.
    (8, 0.375, (1000, 20), (628, 634), (634, 632.5)),
    (8, 0.38, (1000, 20), (628, 634), (634, 632.5)),
    # L(0) = 20, L(1) = 2: L_target(1/3) = 2/3 20 + 1/3 2 = 14 exactly, so 13 and 15 tie: the shorter, 13 (in floats
    # the target was 14.000000000000002, and 15 won).
    (3, 1 / 3, (20, 2), (15, 13), (13, 14)),
    # L(0) = median(8, 9) = 8.5, L(1) = 1: L_target(1/5) = 4/5 8.5 + 1/5 1 = 7 exactly, so 8 and 6 tie: the shorter, 6.
    # An exact p alone is not enough: a median of two lengths is a float, and 4/5 8.5 + 1/5 = 7.000000000000001 chose 8.
    (5, 0.2, ((8, 9), 1), (8, 6), (6, 7)),
])
def test_adacs_target_is_the_brackets_exact_rate(k, rate, anchors, lengths, want):
    def trace(pid, p, n):
        return dict(id=pid, question="q", answer="7", images=[], source="s", pass_rate=p, length=n, correct=True,
                    response=f"<think>{'x' * n}</think> \\boxed{{7}}")
    hard = anchors[0] if isinstance(anchors[0], tuple) else (anchors[0],)  # L(0) is the median of these traces
    pool = [trace("hard", 0.0, n) for n in hard] + [trace("easy", 1.0, anchors[1])]
    pool += [trace("m", rate, n) for n in lengths]
    chosen, _ = data_prep.adacs_curate(pool, k=k, per_bracket=5)
    assert {r["id"]: (r["length"], r["target_length"]) for r in chosen}["m"] == want


@pytest.mark.parametrize("field,other", [("source", "vista"), ("question", "another q"), ("answer", "8")])
def test_adacs_stops_on_one_id_for_two_problems(field, other, tmp_path):
    """Traces are grouped into problems by id, so one id on two problems (two sources merged, each numbering its own
    from 1) would make one problem of them: before, geo's L(0) was the median of 100 and vista's 10, and vista left the
    table. It stops with one line naming the file, the id and the field."""
    trace = dict(id="1", question="q", answer="7", images=[], source="geo", pass_rate=0.0, length=100, correct=True,
                 response="<think>x</think> \\boxed{7}")
    jsonl(tmp_path / "pool.jsonl", [trace, dict(trace, length=10, **{field: other})])
    with pytest.raises(SystemExit) as err:
        data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "2", "--out", str(tmp_path / "x.jsonl")])
    assert str(err.value.code).startswith(f"data error: {tmp_path / 'pool.jsonl'}: problem '1': its traces disagree on "
                                          f"the {field}")
    assert not (tmp_path / "x.jsonl").exists()


def test_adacs_says_which_bracket_sets_the_balanced_count(tmp_path, capsys):
    """By default every bracket keeps as many problems as the smallest one has: one problem at p = 1/2 cuts 4 + 1 + 3
    problems to 3 (one per bracket). The output names that bracket and the flag that keeps more; with --per-bracket
    (or when nothing was cut) there is no such line."""
    rates = [0.0] * 4 + [0.5] + [1.0] * 3
    pool = [dict(id=f"q{i}", question="q", answer="7", images=[], source="s", pass_rate=p, length=10 + i, correct=True,
                 response="<think>x</think> \\boxed{7}") for i, p in enumerate(rates)]
    jsonl(tmp_path / "pool.jsonl", pool)
    for extra, line in (([], "every bracket keeps 1 problem, as many as the smallest, p = 1/2, has: 3 of the 8 with a "
                             "correct trace; --per-bracket N keeps up to N from each"), (["--per-bracket", "3"], None)):
        data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "2", *extra,
                        "--out", str(tmp_path / "sft.jsonl"), "--overwrite"])  # the second replaces the first's
        out = capsys.readouterr().out.splitlines()
        assert [x for x in out if x.startswith("every bracket")] == ([line] if line else [])
        assert out[-1].startswith(f"kept {3 if line else 7} of 8 problems")
    jsonl(tmp_path / "even.jsonl", pool[3:6])  # one problem at each of p = 0, 1/2, 1: nothing cut, nothing to say
    data_prep.main(["adacs", "--data", str(tmp_path / "even.jsonl"), "--k", "2", "--out", str(tmp_path / "e.jsonl")])
    out = capsys.readouterr().out.splitlines()
    assert not [x for x in out if x.startswith("every bracket")] and out[-1].startswith("kept 3 of 3 problems"), out


def test_adacs_cli_grades_and_measures_traces_it_is_not_told_about(tmp_path, tiny, tiny_ckpt):
    tok = data_prep.tokenizer_of(tiny[1])
    pool = [dict(r, correct=None, length=None, pass_rate=None) for r in pool_records() if r["id"] in ("b1", "b2")]
    jsonl(tmp_path / "pool.jsonl", pool)
    data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "4", "--model", str(tiny_ckpt),
                    "--out", str(tmp_path / "sft.jsonl")])
    recs = data_prep.load_records(str(tmp_path / "sft.jsonl"), need_response=True)
    # pass rates from the traces' graded answers (b1: 2 of 2 right, b2: 1 of 2): brackets 4 and 2, one each
    assert sorted((r["id"], r["pass_rate"]) for r in recs) == [("b1", 1.0), ("b2", 0.5)]
    for r in recs:
        assert r["length"] == len(tok(r["response"], add_special_tokens=False)["input_ids"])
        assert r["response"].endswith("\\boxed{7}")


def test_adacs_with_pass_rates_from_another_model_fills_the_p0_bracket(tmp_path):
    """The paper's setting: teacher traces (all correct) joined by id with pass rates a model measured. A problem the
    model never solves (p = 0) still has correct teacher traces, so its bracket is not empty, and it gets the
    longest trace. By hand: L(0) = median(10, 20, 40) = 20 (p0), L(1) = median(10, 20, 40, 12, 22, 44) = 21 (p1, p1b);
    targets: p0 20 -> 20; p1 21 -> 20 (|1|) over 22 and 12; ph (p = 1/2) 20.5 -> 20."""
    teacher = [dict(id=pid, question=f"q {pid}", answer="7", images=[], source="s", length=n,
                    response=f"<think>{'x' * n}</think> \\boxed{{7}}")
               for pid, lengths in (("p0", (10, 20, 40)), ("p1", (10, 20, 40)), ("p1b", (12, 22, 44)),
                                    ("ph", (10, 20, 40)), ("unrated", (5, 6, 7))) for n in lengths]
    rated = [dict(id="p0", question="q", answer="7", pass_rate=0.0), dict(id="p1", question="q", answer="7", pass_rate=1.0),
             dict(id="p1b", question="q", answer="7", pass_rate=1.0), dict(id="ph", question="q", answer="7", pass_rate=0.5)]
    jsonl(tmp_path / "teacher.jsonl", teacher)
    jsonl(tmp_path / "rates.jsonl", rated)
    data_prep.main(["adacs", "--data", str(tmp_path / "teacher.jsonl"), "--pass-rates", str(tmp_path / "rates.jsonl"),
                    "--k", "2", "--per-bracket", "5", "--out", str(tmp_path / "sft.jsonl")])
    got = {r["id"]: (r["pass_rate"], r["length"]) for r in data_prep.load_records(str(tmp_path / "sft.jsonl"))}
    assert got == {"p0": (0.0, 20), "p1": (1.0, 20), "p1b": (1.0, 22), "ph": (0.5, 20)}
    jsonl(tmp_path / "norates.jsonl", [dict(r, pass_rate=None) for r in rated])
    with pytest.raises(SystemExit, match="norates.jsonl: record p0: no pass_rate"):
        data_prep.main(["adacs", "--data", str(tmp_path / "teacher.jsonl"), "--pass-rates",
                        str(tmp_path / "norates.jsonl"), "--out", str(tmp_path / "x.jsonl")])


def test_adacs_takes_pass_rates_from_a_pool_of_traces(tmp_path):
    """--pass-rates may be `passrate --keep-responses`'s pool (K records per problem, one pass rate): it stopped on its
    repeated ids, so a user had to sample again without the flag. Records of one id that disagree on the rate stop.
    By hand (K = 2): L(0) = 30 (h's one trace), L(1) = 10 (e's); both keep their only trace."""
    def rec(pid, p, n):
        return dict(id=pid, question="q", answer="7", images=[], source="s", pass_rate=p, length=n, correct=True,
                    response="<think>x</think> \\boxed{7}")
    teacher = [dict(rec("h", None, 30)), dict(rec("e", None, 10))]
    jsonl(tmp_path / "teacher.jsonl", teacher)
    jsonl(tmp_path / "pool.jsonl", [rec("h", 0.0, 5), rec("h", 0.0, 6), rec("e", 1.0, 7), rec("e", 1.0, 8)])
    data_prep.main(["adacs", "--data", str(tmp_path / "teacher.jsonl"), "--pass-rates", str(tmp_path / "pool.jsonl"),
                    "--k", "2", "--out", str(tmp_path / "sft.jsonl")])
    got = {r["id"]: (r["pass_rate"], r["length"]) for r in data_prep.load_records(str(tmp_path / "sft.jsonl"))}
    assert got == {"h": (0.0, 30), "e": (1.0, 10)}
    jsonl(tmp_path / "bad.jsonl", [rec("h", 0.0, 5), rec("h", 0.5, 6), rec("e", 1.0, 7)])
    with pytest.raises(SystemExit) as err:
        data_prep.main(["adacs", "--data", str(tmp_path / "teacher.jsonl"), "--pass-rates", str(tmp_path / "bad.jsonl"),
                        "--k", "2", "--out", str(tmp_path / "x.jsonl")])
    assert str(err.value.code) == f"data error: {tmp_path / 'bad.jsonl'}: problem 'h': its records disagree on the " \
                                  f"pass rate ([0.0, 0.5])"


def test_adacs_warns_when_hard_problems_have_no_longer_traces(tmp_path, capsys):
    """A source whose traces are no longer on the problems the model fails (L(0) <= L(1)) gets a warning that says
    what to do; a source whose L(0) is clearly above L(1) gets none. By hand: 'flat' L(0) = median(70, 73, 76) = 73,
    L(1) = median(75, 78, 81) = 78 (the issue's second task: longer traces at p = 1); 'edge' L(0) = 60 < 1.2 x 52;
    'fine' L(0) = 90 >= 1.2 x 40 = 48."""
    pool = [dict(id=f"{src}{p}", question="q", answer="7", images=[], source=src, pass_rate=float(p), length=n,
                 response=f"<think>{'x' * n}</think> \\boxed{{7}}", correct=True)
            for src, lengths in (("flat", ((70, 73, 76), (75, 78, 81))), ("edge", ((60,), (52,))), ("fine", ((90,), (40,))))
            for p, ns in enumerate(lengths) for n in ns]
    jsonl(tmp_path / "pool.jsonl", pool)
    data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "1", "--out", str(tmp_path / "sft.jsonl")])
    warnings = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning")]
    assert [w.split("'")[1] for w in warnings] == ["edge", "flat"]
    assert "L(0) = 73 tokens is not clearly above L(1) = 78" in warnings[1]
    assert "cold start will write one length everywhere" in warnings[1] and "longer candidate traces" in warnings[1]


def test_adacs_warning_for_a_source_of_one_pass_rate_says_so(tmp_path, capsys):
    """A source whose problems all have p = 1/2 (K = 2) takes both anchors from that bracket: L(0) = L(1) = median(50,
    60) = 55. Its targets are flat because the pass rates do not spread, not because its hard problems' traces are
    short (it has none), and longer traces would not help: the warning says that, and what to do."""
    pool = [dict(id=f"q{n}", question="q", answer="7", images=[], source="one", pass_rate=0.5, length=n, correct=True,
                 response="<think>x</think> \\boxed{7}") for n in (50, 60)]
    jsonl(tmp_path / "pool.jsonl", pool)
    data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "2", "--out", str(tmp_path / "sft.jsonl")])
    warnings = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: source 'one': every problem has the pass rate 1/2, "
                                                         "so L(0) = L(1) = 55 tokens")
    assert "longer candidate traces" not in warnings[0] and "fails some of its problems" in warnings[0]


def test_adacs_table_shows_the_anchors_the_warning_compares(tmp_path, capsys):
    """L(0) = median(119, 120) = 119.5 < 1.2 x L(1) = 120 warns; the table showed L(0) to 3 digits, 120, beside that
    warning, and a paper-length anchor, median(4123, 4124), as 4.12e+03. Both are shown as computed."""
    pool = [dict(id=f"{src}{p}", question="q", answer="7", images=[], source=src, pass_rate=float(p), length=n,
                 correct=True, response="<think>x</think> \\boxed{7}")
            for src, anchors in (("near", ((119, 120), (100,))), ("long", ((4123, 4124), (1000,))))
            for p, ns in enumerate(anchors) for n in ns]  # one problem per source and p
    jsonl(tmp_path / "pool.jsonl", pool)
    data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "1", "--out", str(tmp_path / "sft.jsonl")])
    out = capsys.readouterr().out.splitlines()
    rows = {x.split()[0]: x.split() for x in out if x.split()[:1] in (["near"], ["long"])}
    assert rows["near"][3] == "119.5" and rows["near"][5] == "100" and rows["long"][3] == "4123.5"
    warnings = [x for x in out if x.startswith("warning")]
    assert len(warnings) == 1 and "'near': L(0) = 119.5 tokens is not clearly above L(1) = 100" in warnings[0]


def test_pass_rates_rounded_to_two_decimals_pass_and_a_wrong_k_gets_honest_advice():
    rows = lambda *rates: [dict(id=f"r{i}", pass_rate=p) for i, p in enumerate(rates)]  # noqa: E731
    for k, rates in ((8, (0.38, 0.13, 0.875, 0, 1)), (3, (0.33, 0.67)), (6, (0.17, 0.83)), (16, (1 / 16, 0.5))):
        assert data_prep.check_pass_rates(rows(*rates), k, "f") == rows(*rates)  # c/K, rounded or exact
    with pytest.raises(data_prep.DataError) as e:  # K = 16 read as K = 8: 1/16 is 0.0625 from both neighbours
        data_prep.check_pass_rates(rows(0.5, 1 / 16), 8, "f")
    assert str(e.value) == "f: record r1: pass_rate 0.0625 is not a multiple of 1/8 (--k 8): the pass rates look like " \
                           "K = 16 (pass --k 16)"
    with pytest.raises(data_prep.DataError) as e:  # rounded thirds read as K = 8: 0.33 is exactly 33/100, no advice
        data_prep.check_pass_rates(rows(0, 0.33, 0.67, 1), 8, "f")
    assert "pass_rate 0.33 is not a multiple of 1/8 (--k 8): give --k the number of samples" in str(e.value)
    # K = 128: 7/128 = 0.0547 rounded to 0.05 lies 0.003 from 6/128 and was read as 6 right; exact rates still pass
    assert data_prep.check_pass_rates(rows(7 / 128, 0.9140625), 128, "f") == rows(7 / 128, 0.9140625)
    with pytest.raises(data_prep.DataError) as e:
        data_prep.check_pass_rates(rows(7 / 128, 0.05), 128, "f")
    assert "record r1: pass_rate 0.05 is not a multiple of 1/128 (--k 128)" in str(e.value)
    assert str(e.value).endswith("written to 6 decimals or more (past K = 100, a rate rounded to 2 decimals fits no "
                                 "single c/K)")
    # written to 6 decimals, 7/128 = 0.0546875 is 0.054688 (5e-7 off) and passes; to 4, 0.0547 (1.25e-5 off) does not
    assert data_prep.check_pass_rates(rows(0.054688, 0.914062), 128, "f") == rows(0.054688, 0.914062)
    with pytest.raises(data_prep.DataError, match="record r0: pass_rate 0.0547 is not a multiple of 1/128"):
        data_prep.check_pass_rates(rows(0.0547, 0.914062), 128, "f")


def test_every_rate_rounded_to_2_decimals_passes_in_its_own_bracket_while_k_is_at_most_100():
    """README (choices, AdaCS): 'a rate rounded to 2 decimals passes while K <= 100, past that it needs 6'. Every c/K
    for K = 1..100, rounded to 2 decimals, passes --k K and falls in bracket c; at K = 101, 1/101 rounded (0.01) stops,
    and written to 6 decimals passes."""
    for K in range(1, 101):
        rows = [dict(id=f"c{c}", pass_rate=round(c / K, 2)) for c in range(K + 1)]
        assert data_prep.check_pass_rates(rows, K, "f") == rows, K
        assert [data_prep.bracket_of(r["pass_rate"], K) for r in rows] == list(range(K + 1)), K
    with pytest.raises(data_prep.DataError, match="record c1: pass_rate 0.01 is not a multiple of 1/101"):
        data_prep.check_pass_rates([dict(id="c1", pass_rate=round(1 / 101, 2))], 101, "f")
    sixth = [dict(id=f"c{c}", pass_rate=round(c / 101, 6)) for c in range(102)]
    assert data_prep.check_pass_rates(sixth, 101, "f") == sixth


def test_an_empty_trace_is_a_wrong_trace_of_length_0(tmp_path):
    """A sample that ends at once (passrate writes response "", length 0) is one of the K samples behind p, so it counts
    toward the anchors like any wrong trace and is never chosen; the pool is not rejected. By hand (K = 4):
    L(0) = median(0, 80, 100, 120) = 90 (z, its empty trace included; 100 without it), L(1) = median(10, 20, 30, 40)
    = 25 (e); h (p = 1/4) gets its one correct trace, 90, e the trace nearest 25: 20 (a tie with 30, to the shorter)."""
    def trace(pid, p, n, correct):
        return dict(id=pid, question=f"q {pid}", answer="7", images=[], source="s", pass_rate=p, length=n,
                    correct=correct, response=f"<think>{'x' * n}</think> \\boxed{{{7 if correct else 5}}}" if n else "")
    pool = [trace("z", 0.0, n, False) for n in (0, 80, 100, 120)] + [trace("e", 1.0, n, True) for n in (20, 30, 40, 10)]
    pool += [trace("h", 0.25, n, c) for n, c in ((0, False), (50, False), (70, False), (90, True))]
    jsonl(tmp_path / "pool.jsonl", pool)
    data_prep.main(["adacs", "--data", str(tmp_path / "pool.jsonl"), "--k", "4", "--per-bracket", "5",
                    "--out", str(tmp_path / "sft.jsonl")])
    got = {r["id"]: (r["length"], r["target_length"]) for r in map(json.loads, open(tmp_path / "sft.jsonl"))}
    assert got == {"e": (20, 25), "h": (90, 0.75 * 90 + 0.25 * 25)}  # with L(0) = 100, h's target would be 81.25

    bad = tmp_path / "bad.jsonl"
    garbage = [({k: v for k, v in pool[0].items() if k != "response"}, "trace of problem 'z': field 'response' is missing"),
               (dict(pool[0], response=5), "row 11 (id z): the response (column 'response') must be text, got 5"),
               (dict(pool[0], correct=True), "trace of problem 'z': field 'response' is empty but 'correct' is true")]
    for row, message in garbage:  # still stops the pool, with one line naming the file, the problem and the field
        jsonl(bad, pool[1:] + [row])
        with pytest.raises(SystemExit) as err:
            data_prep.main(["adacs", "--data", str(bad), "--k", "4", "--out", str(tmp_path / "x.jsonl")])
        assert str(err.value.code) == f"data error: {bad}: {message}"
        assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------
# passrate


def test_prompts_encoded_together_are_what_the_processor_gives_each_alone(demo_data, tiny, tmp_path):
    """encode_prompts makes one processor call for many records; each record gets the ids, pixels and grid that the
    processor gives it called on its own, whatever its neighbours are: one image, two images of other sizes, none.
    prompt_length (which counts from the image sizes alone, without pixels) agrees with the encoded length."""
    _, processor = tiny
    recs = data_prep.load_records(str(demo_data["test"]))[:4]
    Image.new("RGB", (56, 84), RED).save(tmp_path / "wide.png")
    recs[1] = dict(recs[1], images=[recs[1]["images"][0], str(tmp_path / "wide.png")], image_sizes=None)
    recs[2] = dict(recs[2], images=[], question="What is 2 + 2?")
    for batch in (recs, recs[1:3], recs[2:3]):
        for rec, got in zip(batch, data_prep.encode_prompts(processor, batch)):
            text = data_prep.prompt_text(processor, rec)
            if rec["images"]:
                alone = processor(text=[text], images=[data_prep.open_image(im) for im in rec["images"]],
                                  return_tensors="pt")
                want = dict(ids=alone["input_ids"][0], pixel_values=alone["pixel_values"],
                            image_grid_thw=alone["image_grid_thw"])
            else:
                want = dict(ids=torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"]),
                            pixel_values=None, image_grid_thw=None)
            for key, value in want.items():
                assert (got[key] is None) if value is None else torch.equal(got[key], value), (rec["id"], key)
            assert data_prep.prompt_length(processor, rec) == len(want["ids"]), rec["id"]


def test_grading_by_hand():
    texts = ["<think>..</think> \\boxed{3}", "\\boxed{4}", "the answer is 3", "\\boxed{1} no, \\boxed{3.0}"]
    assert data_prep.grade(texts, "3") == [True, False, False, True]


def test_batches_do_not_depend_on_the_number_of_ranks():
    for n, batch in ((7, 2), (4, 4), (1, 3)):
        one = ev.rank_batches(n, batch, 0, 1)
        for world in (2, 3):
            parts = sorted(b for r in range(world) for b in ev.rank_batches(n, batch, r, world))
            assert parts == one
        assert [i for _, idx in one for i in idx] == list(range(n))


def test_passrate_is_k_graded_samples_and_the_same_on_one_and_two_processes(tmp_path, tiny_ckpt, demo_data):
    K = 4
    args = [str(a) for a in ("passrate", "--data", demo_data["test"], "--model", tiny_ckpt, "--k", K, "--limit", 4,
                             "--max-new-tokens", 32, "--batch-size", 2, "--seed", 1, "--keep-responses")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1): the same float reductions
    try:
        ev.main(args + ["--out", str(tmp_path / "one.jsonl")])  # one process: this one (eval.py runs passrate)
    finally:
        torch.set_num_threads(threads)
    run_script(["eval.py"] + args + ["--out", tmp_path / "two.jsonl"], nproc=2)
    one = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert one == two
    traces = defaultdict(list)
    for r in one:
        traces[r["id"]].append(r)
    assert len(traces) == 4 and all(len(t) == K for t in traces.values())
    for ts in traces.values():
        assert {t["pass_rate"] for t in ts} == {sum(t["correct"] for t in ts) / K}
        assert ts[0]["pass_rate"] in {c / K for c in range(K + 1)}
        assert len({t["response"] for t in ts}) > 1  # K different samples, not one repeated
        for t in ts:
            assert 0 <= t["length"] <= 32
            assert t["correct"] is False or "\\boxed{" in t["response"]  # no \boxed{}, no credit
    with Image.open(tmp_path / one[0]["images"][0]) as im:  # the demo image, referenced relative to the output
        assert im.size == (28, 112)


# ----------------------------------------------------------------------------------------------------------
# demo


PALETTE = {(220, 30, 30): "red", (30, 160, 30): "green", (30, 60, 220): "blue", (230, 190, 0): "yellow"}


def read_grid(path) -> dict:
    """The length of each colour's bar in a demo image, from pixels: per 28-px cell, the colour filling its top half
    and the width of the black run from the left edge of its bottom half (7 px per unit, white after it)."""
    a = pixels(path).astype(int)
    lengths = {}
    for k in range(a.shape[0] // 28):
        cell = a[28 * k:28 * (k + 1)]
        top, bottom = cell[:14], cell[14:]
        colour = PALETTE[tuple(top[0, 0])]
        assert (top == top[0, 0]).all()  # the top half is one colour
        black = (bottom == 0).all(-1)
        width = int(black[0].sum())
        assert (black == black[0]).all() and not black[0, width:].any() and (bottom[~black] == 255).all()
        assert width % 7 == 0 and colour not in lengths
        lengths[colour] = width // 7
    assert set(lengths) == set(PALETTE.values())
    return lengths


def answer_from(question: str, v: dict) -> int:
    """The answer recomputed from the question text and the lengths read from the pixels."""
    if m := re.fullmatch(r"How long is the (\w+) bar\?", question):
        return v[m[1]]
    if m := re.fullmatch(r"What is the sum of the (\w+) and (\w+) bars\?", question):
        return v[m[1]] + v[m[2]]
    m = re.fullmatch(r"Add the (\w+) and (\w+) bars and the (\w+) and (\w+) bars, then multiply the sums\.", question)
    return (v[m[1]] + v[m[2]]) * (v[m[3]] + v[m[4]])


def worked_out(think: str) -> list[tuple[int, str, int, int]]:
    """Every operation written in a trace's thinking ('3 * 2 = 6', also inside the one line), recomputed: (a, op, b,
    what was written)."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in re.findall(r"(\d+) ([*+]) (\d+) = (\d+)", think)]


def test_demo_answers_recomputed_from_the_pixels(demo_data):
    for split, path in demo_data.items():
        for line in open(path):
            r = json.loads(line)
            truth = answer_from(r["question"], read_grid(Path(path).parent / r["images"][0]))
            assert r["answer"] == str(truth), (split, r["id"])
            said = data_prep.extract_boxed(r["response"])
            line = re.search(r"Compute: [^=]* = (\d+)\.", r["response"])
            if split == "pool_traces" and said != str(truth):  # the teacher's slips, and no other error
                slips = {(1, "terse", str(1 - truth)), (1, "steps", str(1 - truth)),  # a short bar misread
                         (2, "terse", str(truth + 1)), (3, "terse", str(truth + 1))}  # a bare sum one off
                if r["level"] == 3 and r["style"] == "steps":  # a hard problem's line off by 1 or 2
                    assert line[1] == said and 1 <= abs(int(said) - truth) <= 2, r["id"]
                else:
                    assert (r["level"], r["style"], said) in slips, (r["id"], r["style"])
            else:
                assert said == str(truth), (split, r["id"])
            if r["style"] == "recheck" and r["level"] > 1:  # the re-check works every operation out, rightly
                check = r["response"].split(" again:")[1]
                assert all((a * b if op == "*" else a + b) == c for a, op, b, c in worked_out(check)), r["id"]
                assert len(worked_out(check)) == 2 * r["level"] - 3 and f"the answer is {truth}." in check, r["id"]


def test_demo_levels_in_every_split_and_teacher_traces_of_three_lengths(demo_data, tiny, tmp_path):
    """Every split has the three levels. The teacher pool holds, per problem, a terse, a steps and a re-check trace,
    in that order of length; the steps and re-check traces grow with the level, the terse one does not. Every trace
    is right, except the teacher's three slips: for some of the easy problems whose bar is 0 or 1 units long, and for
    no other easy one, the terse and steps traces read the other short length (a re-check is needed); most terse
    traces of medium and hard problems are one off (arithmetic without the work); and some hard steps traces have
    their one line off, where the re-check shows the same line and catches it. The warm-up's hard re-checks catch a
    slipped line too, some of the time."""
    tok = data_prep.tokenizer_of(tiny[1])
    ntok = lambda r: len(tok(r["response"], add_special_tokens=False)["input_ids"])  # noqa: E731
    for split, path in demo_data.items():
        assert sorted({json.loads(line)["level"] for line in open(path)}) == [1, 2, 3], split
    traces = defaultdict(dict)
    for line in open(demo_data["pool_traces"]):
        r = json.loads(line)
        traces[r["id"]][r["style"]] = (r["level"], ntok(r), data_prep.extract_boxed(r["response"]) == r["answer"])
    assert {json.loads(line)["id"] for line in open(demo_data["pool"])} == set(traces)
    short = set()  # easy problems whose bar is 0 or 1 units long, read back from the steps trace
    for line in open(demo_data["pool"]):
        r = json.loads(line)
        lengths = [int(d) for d in re.findall(r" is (\d)\.", r["response"].split("</think>")[0])]
        if r["level"] == 1 and lengths[0] <= 1:
            short.add(r["id"])
    wrong = {pid: [not t[s][2] for s in data_prep.STYLES] for pid, t in traces.items()}
    misread = {pid for pid, w in wrong.items() if traces[pid]["steps"][0] == 1 and any(w)}
    assert 0 < len(misread) and misread <= short  # only short bars are misread (MISREAD = 0.9 of them)
    assert all(wrong[pid] == [True, True, False] for pid in misread)
    arithmetic = [w for pid, w in wrong.items() if traces[pid]["steps"][0] > 1]
    assert all(not w[2] for w in arithmetic)  # a re-check is right
    assert 0.5 < sum(w[0] for w in arithmetic) / len(arithmetic) < 1  # most bare answers slip, not all
    assert not any(w[1] for pid, w in wrong.items() if traces[pid]["steps"][0] == 2)  # one addition in a line is right
    hard = [pid for pid in wrong if traces[pid]["steps"][0] == 3]
    assert 0 < sum(wrong[pid][1] for pid in hard) < len(hard)  # some hard lines slip, not all
    line = lambda text: re.search(r"Compute: (.*?)\.", text)[1]  # noqa: E731
    responses = {(r["id"], r["style"]): r["response"] for r in map(json.loads, open(demo_data["pool_traces"]))}
    for pid in hard:  # the re-check shows the line of the steps trace, slipped or not, then works it out
        assert line(responses[pid, "recheck"]) == line(responses[pid, "steps"]), pid
    by = defaultdict(list)
    for pid, t in traces.items():
        assert set(t) == {"terse", "steps", "recheck"}, pid
        assert t["terse"][1] < t["steps"][1] < t["recheck"][1], pid
        for style, (level, n, _) in t.items():
            by[style, level].append(n)
    for style in ("steps", "recheck"):
        assert max(by[style, 1]) < min(by[style, 2]) and max(by[style, 2]) < min(by[style, 3]), style
    hard = [n + 1 for n in by["recheck", 3]]  # + its end of turn, as the cold start counts it
    assert 93 <= min(hard) and max(hard) == 97  # README (choices): --max-response-len 96 would drop some; 128 none
    assert max(max(by["terse", lv]) for lv in (1, 2, 3)) - min(min(by["terse", lv]) for lv in (1, 2, 3)) <= 3
    sft = [json.loads(line) for line in open(demo_data["sft"])]  # the warm-up data: every style, each its own trace
    assert {r["style"] for r in sft} == set(data_prep.STYLES)
    for r in sft:  # the style, read back from the text: terse reads nothing, steps reads, recheck reads twice
        think = r["response"].split("</think>")[0]
        assert (" is " in think, " again:" in think) == {"terse": (False, False), "steps": (True, False),
                                                             "recheck": (True, True)}[r["style"]], r["id"]
        assert data_prep.demo_style(r["response"]) == r["style"], r["id"]
    more = data_prep.make_demo(tmp_path, seed=1, sizes={"sft": 240})["sft"]  # about 27 hard re-checks
    caught = [re.search(r"Compute: [^=]* = (\d+)\.", r["response"])[1] != r["answer"]
              for r in map(json.loads, open(more)) if r["level"] == 3 and r["style"] == "recheck"]
    assert 0 < sum(caught) < len(caught)  # some warm-up re-checks catch a slipped line, the others confirm it


def test_demo_colours_and_recheck_words_are_one_token_each(demo_data, tiny):
    """The tiny tokenizer (trained on TINY_CORPUS) gives every colour name, in the question and in a trace wherever it
    stands, one token, and so every opener and verb of a re-check: reading a bar means finding one token by its
    colour, the same token wherever the name stands, and --trigger-words finds a reasoning word by decoding one
    token (ares.TRIGGER_WORDS)."""
    tok = data_prep.tokenizer_of(tiny[1])
    words = {c for c in data_prep.COLOURS} | {c.capitalize() for c in data_prep.COLOURS} | set(data_prep.OPENERS) \
        | set(data_prep.VERBS)
    seen = set()
    for split in ("sft", "pool_traces"):
        for r in map(json.loads, open(demo_data[split])):
            for text in (r["question"], r["response"]):
                pieces = [tok.decode([i]).strip() for i in tok(text, add_special_tokens=False)["input_ids"]]
                for w in words:
                    for _ in re.finditer(rf"\b{w}\b", text):
                        assert w in pieces, (w, text)
                        seen.add(w)
    assert seen == words
    assert {w.lower() for w in (*data_prep.OPENERS, *data_prep.VERBS)} <= set(ares.TRIGGER_WORDS)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    sizes = {"sft": 6, "test": 3}

    def files(seed, name):
        data_prep.make_demo(tmp_path / name, seed=seed, sizes=sizes)
        return {p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}

    assert files(5, "a") == files(5, "b")
    assert files(5, "a") != files(6, "c")


@pytest.mark.parametrize("mine", ["images/photo.png", "test.jsonl"])
def test_demo_replaces_its_own_output_and_nothing_else(mine, tmp_path):
    """demo --out a folder that already held a user's data (an images/ folder of their own, their test.jsonl) deleted
    it without a word: the demo replaces images/ and its five .jsonl files whole. Now it stops with one line naming the
    file, before anything is written; into a folder the demo wrote (another seed, as ares.py's demo reruns it) it goes
    on with --overwrite, and leaves every other file there alone."""
    small = ["--sft", "3", "--pool", "3", "--rl", "3", "--test", "3"]
    out = tmp_path / "data"
    data_prep.main(["demo", "--out", out, *small])
    (out / "pass_rates.jsonl").write_text("{}\n")  # what the later stages of ares.py's demo add beside it
    data_prep.main(["demo", "--out", out, "--seed", "1", *small, "--overwrite"])
    assert (out / "pass_rates.jsonl").read_text() == "{}\n" and len(list((out / "images").iterdir())) == 12
    theirs = tmp_path / "theirs"
    (theirs / mine).parent.mkdir(parents=True, exist_ok=True)
    (theirs / mine).write_bytes(png(RED) if mine.endswith(".png") else b'{"id": "q", "question": "Q", "answer": "1"}\n')
    before = files(theirs)
    with pytest.raises(SystemExit) as err:
        data_prep.main(["demo", "--out", theirs, *small])
    assert str(err.value.code) == (f"--out {theirs}: {theirs / mine} is not the demo's, and the demo replaces images/ "
                                   "and its .jsonl files there: give a new folder")
    assert files(theirs) == before


def test_demo_stops_on_a_users_file_under_each_name_of_records_it_writes(tmp_path):
    """Each .jsonl file the demo writes (listed from a folder it wrote, not from DEMO_FILES) replaces a user's file of
    that name: a user's sft.jsonl or pool_traces.jsonl stops it as their test.jsonl does, with nothing written."""
    small = ["--sft", "2", "--pool", "2", "--rl", "2", "--test", "2"]
    data_prep.main(["demo", "--out", tmp_path / "data", *small])
    written = sorted(p.name for p in (tmp_path / "data").glob("*.jsonl"))
    assert written == ["pool.jsonl", "pool_traces.jsonl", "rl.jsonl", "sft.jsonl", "test.jsonl"]
    for name in written:
        theirs = tmp_path / f"theirs_{name}"
        theirs.mkdir()
        mine = b'{"id": "q", "question": "Q", "answer": "1"}\n'
        (theirs / name).write_bytes(mine)
        with pytest.raises(SystemExit) as err:
            data_prep.main(["demo", "--out", theirs, *small])
        assert str(err.value.code).startswith(f"--out {theirs}: {theirs / name} is not the demo's"), err.value.code
        assert files(theirs) == {name: mine}  # nothing written beside it


def test_a_records_options_are_shown_once_and_its_answer_letter_stays_put_over_stages(tmp_path):
    """A JSONL record with `choices`: the options go into the question as (A) lines and the answer becomes their
    letter, once. Read again (the records passrate and adacs write), nothing moves: options ["B", "A", "C"] with answer
    "A" mean option B first, and B stays B (read as a text again, "B" would become option A, then B, then A). A
    question that lists its options in its own words (MathVerse's "Choices:\\nA:30°") is not given a second list;
    an answer equal to one option as a number or but for case names it."""
    rows = [dict(id="p", question="Which point is the vertex?", answer="A", choices=["B", "A", "C"]),
            dict(id="v", question="Find x.\nChoices:\nA:30°\nB:60°", answer="60°", choices=["30°", "60°"]),
            dict(id="n", question="How many?", answer=1, choices=[1.0, 2]),
            dict(id="y", question="Is it red?", answer="yes", choices=["Yes", "No"]),
            dict(id="s", question="Which of statements (A) and (B) holds?", answer="Both", choices=["Only (A)", "Both"])]
    first = data_prep.load_records(str(jsonl(tmp_path / "a.jsonl", rows)))
    assert [(r["answer"], r["choices"]) for r in first] == [("B", ["B", "A", "C"]), ("B", ["30°", "60°"]),
                                                           ("A", ["1.0", "2"]), ("A", ["Yes", "No"]),
                                                           ("B", ["Only (A)", "Both"])]
    assert first[4]["question"].endswith("\nChoices:\n(A) Only (A)\n(B) Both")  # "(A)", "(B)" alone are no list
    assert first[0]["question"] == "Which point is the vertex?\nChoices:\n(A) B\n(B) A\n(C) C"
    assert first[1]["question"] == rows[1]["question"]  # its own list, not a second one
    again = data_prep.load_records(str(jsonl(tmp_path / "b.jsonl", [
        {k: r[k] for k in ("id", "question", "answer", "choices")} for r in first])))
    assert [(r["question"], r["answer"]) for r in again] == [(r["question"], r["answer"]) for r in first]
    assert data_prep.is_correct("B", data_prep.gold_of(first[0])) is True  # a letter is read as a letter
    assert data_prep.is_correct("A", data_prep.gold_of(first[0])) is False


def test_ctrl_c_in_data_prep_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """convert of a large set (ViRL39K: 39k images) takes minutes: a Ctrl-C ended it in a traceback with exit -2."""
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data_prep, "run_convert", interrupted)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(dict(id=1, question="q", answer="1")) + "\n")
    with pytest.raises(SystemExit) as e:
        try:
            data_prep.main(["convert", "--data", str(src), "--out", str(tmp_path / "out.jsonl")])
        except KeyboardInterrupt:  # the code before: a traceback
            pytest.fail("the Ctrl-C escaped as a KeyboardInterrupt")
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted (Ctrl-C): {tmp_path / 'out.jsonl'} holds what it held before or nothing (every output is written "
        "whole, then renamed into place); the same command writes it")
    # a demo stopped between its files, into a new folder, leaves some there, which the same command refuses without
    # --overwrite: the line says to add it (it said "the same command writes it", which then stopped)
    def part_written(args):
        (Path(args.out) / "images").mkdir(parents=True)
        raise KeyboardInterrupt
    monkeypatch.setattr(data_prep, "run_demo", part_written)
    demo = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        data_prep.main(["demo", "--out", str(demo)])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # it said "holds what it held before or nothing"
        f"interrupted (Ctrl-C): {demo} holds whole files only, each the one it held before or one this command wrote "
        "before the stop (every output is written whole, then renamed into place); the same command with --overwrite "
        "writes it")
    with pytest.raises(SystemExit) as e:
        data_prep.main(["demo", "--out", str(demo)])
    assert str(e.value.code).startswith(f"--out {demo} holds a demo (images/): add --overwrite")


def test_the_demo_teachers_slips_happen_as_often_as_the_readme_says(tmp_path):
    """README "The teacher pool", counted on a demo-sized pool (1,200 problems, seed 0): for 90% of the easy problems
    whose bar is 0 or 1 units long the terse and steps traces read the wrong length and only the re-check is right
    (MISREAD); 80% of the terse answers to medium and hard problems are one off (SLIP); for 40% of the hard problems
    the steps line is off by 1 or 2 and the re-check, which shows that same line, answers right (LINE_SLIP)."""
    said = " ".join((ROOT / "README.md").read_text().split())
    for words in ("For 90% of the easy problems whose bar is 0 or 1 units long, its terse and steps traces give the "
                  "other short length, and only its re-check is right.",
                  "80% of its terse answers to medium and hard problems are one off",
                  "For 40% of the hard problems its steps line is off by 1 or 2, and its re-check shows that same line, "
                  "then works the operations out and answers right."):
        assert words in said, words
    paths = data_prep.make_demo(tmp_path, seed=0, sizes=dict(sft=3, pool=1200, rl=3, test=3))
    traces = defaultdict(dict)  # id -> style -> (level, how far its answer is off, the right answer)
    for r in map(json.loads, open(paths["pool_traces"])):
        traces[r["id"]][r["style"]] = (r["level"], int(data_prep.extract_boxed(r["response"])) - int(r["answer"]),
                                       int(r["answer"]))
    easy_short = [t for t in traces.values() if t["steps"][0] == 1 and t["steps"][2] <= 1]  # easy: the answer is the
    # bar's length
    misread = [t for t in easy_short if t["terse"][1] != 0 and t["steps"][1] != 0 and t["recheck"][1] == 0]
    assert 0.85 < len(misread) / len(easy_short) < 0.95, (len(misread), len(easy_short))
    bare = [t["terse"][1] for t in traces.values() if t["steps"][0] > 1]
    assert 0.75 < sum(abs(d) == 1 for d in bare) / len(bare) < 0.85
    hard = [t for t in traces.values() if t["steps"][0] == 3]
    slipped = [t for t in hard if t["steps"][1] != 0]
    assert all(abs(t["steps"][1]) in (1, 2) and t["recheck"][1] == 0 for t in slipped)
    assert 0.35 < len(slipped) / len(hard) < 0.45, (len(slipped), len(hard))
