"""Data for ARES: records in the format of ares.py (spec §10), and the offline demo task.

    python data_prep.py demo --out data/demo                 # the procedurally generated multimodal demo task

The demo task: a 4 x 4 grid of cells, some holding a red, green or blue square. Three difficulty levels ask
for one count (easy), a sum of two counts (medium), or a product of two counts plus a third (hard). Each record
carries a step-by-step trace ("<think> ... </think> \\boxed{N}") whose length grows with the level, so the
cold start has something adaptive to learn. Each 28 x 28 pixel cell is exactly one merged vision token of
Qwen2.5-VL (14-pixel patches, 2 x 2 merge), which makes the task learnable by the tiny model on a CPU.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 60, 220)}
LEVELS = {1: "easy", 2: "medium", 3: "hard"}
GRID, CELL, INSET = 4, 28, 3  # 4 x 4 cells of 28 px: a 112 x 112 image


def demo_problem(rng: random.Random, level: int) -> dict:
    """One problem: the colour of every cell, the question, the answer and the reasoning trace."""
    counts = {c: rng.randint(0, 4) for c in COLOURS}
    cells = [c for c, n in counts.items() for _ in range(n)] + [None] * (GRID * GRID - sum(counts.values()))
    rng.shuffle(cells)
    a, b, c = rng.sample(list(COLOURS), 3)
    steps = [f"Count the {a} squares: {counts[a]}."]
    if level == 1:
        question, answer = f"How many {a} squares are in the image?", counts[a]
    elif level == 2:
        answer = counts[a] + counts[b]
        question = f"How many {a} and {b} squares are there in total?"
        steps += [f"Count the {b} squares: {counts[b]}.", f"Add them: {counts[a]} + {counts[b]} = {answer}."]
    else:
        product = counts[a] * counts[b]
        answer = product + counts[c]
        question = f"Multiply the number of {a} squares by the number of {b} squares, then add the number of {c} squares."
        steps += [f"Count the {b} squares: {counts[b]}.", f"Count the {c} squares: {counts[c]}.",
                  f"Multiply: {counts[a]} * {counts[b]} = {product}.", f"Add: {product} + {counts[c]} = {answer}."]
    response = "<think>" + " ".join(steps) + "</think> The answer is \\boxed{" + str(answer) + "}."
    return dict(cells=cells, question=question, answer=str(answer), response=response)


def draw_grid(cells: list[str | None]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (GRID * CELL, GRID * CELL), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, colour in enumerate(cells):
        if colour:
            x, y = (k % GRID) * CELL, (k // GRID) * CELL
            draw.rectangle([x + INSET, y + INSET, x + CELL - 1 - INSET, y + CELL - 1 - INSET], fill=COLOURS[colour])
    return img


def make_demo(out: Path, seed: int = 0, sizes: dict | None = None) -> dict:
    """Write sft.jsonl (with traces), rl.jsonl and test.jsonl (held out) plus their PNG images under `out`.
    Levels are balanced in every split. Deterministic for a seed. Returns {split: path}."""
    sizes = sizes or {"sft": 3000, "rl": 1000, "test": 300}
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, n in sizes.items():
        rows = []
        for k in range(n):
            level = k % 3 + 1
            prob = demo_problem(rng, level)
            rid = f"{split}-{k:05d}"
            draw_grid(prob["cells"]).save(out / "images" / f"{rid}.png")
            rows.append(dict(id=rid, question=prob["question"], answer=prob["answer"], images=[f"images/{rid}.png"],
                             response=prob["response"], source="demo", level=level, difficulty=LEVELS[level]))
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the offline demo task (sft / rl / test splits)")
    demo.add_argument("--out", default="data/demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--train", type=int, default=3000, help="cold-start records (with traces)")
    demo.add_argument("--rl", type=int, default=1000, help="AEPO prompts")
    demo.add_argument("--test", type=int, default=300, help="held-out records")
    args = parser.parse_args(argv)
    if args.command == "demo":
        paths = make_demo(Path(args.out), args.seed, {"sft": args.train, "rl": args.rl, "test": args.test})
        for split, path in paths.items():
            print(f"{split}: {path}")


if __name__ == "__main__":
    main()
