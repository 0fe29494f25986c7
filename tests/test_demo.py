"""The embedded default, end to end at a reduced size: `python ares.py --demo-steps 2`."""
import json

from conftest import run_script

LEVELS = ("easy", "medium", "hard")


def test_default_command_runs_every_stage_and_reports_every_field(tmp_path):
    out = tmp_path / "demo"
    res = run_script(["ares.py", "--demo-steps", "2", "--out", out], timeout=900)
    # every stage ran and left its artefacts
    for split in ("sft", "rl", "test"):
        assert (out / "data" / f"{split}.jsonl").stat().st_size > 0
    for stage, steps in (("coldstart", 10), ("aepo", 2)):
        assert (out / stage / "final" / "COMPLETE").exists()
        assert (out / stage / "final" / "model.safetensors").exists()
        rows = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
    aepo_row = rows[-1]
    for key in ("reward", "acc", "len", "n_he", "tau", "groups_kept", "branches", "time_sample", "time_update",
                *(f"{k}_{b}" for k in ("n", "len", "n_he", "acc", "target", "kappa") for b in LEVELS)):
        assert key in aepo_row, key
    # the final table: both checkpoints, every level and overall, greedy and sampled
    report = json.loads((out / "demo.json").read_text())
    for mode in ("greedy", "sampled"):
        metrics = report[mode]["metrics"]["test"]
        assert set(metrics) == {"cold start", "after AEPO"}
        for model in metrics.values():
            assert set(model["buckets"]) == set(LEVELS)
            for row in [model["overall"], *model["buckets"].values()]:
                assert 0 <= row["accuracy"] <= 1 and row["mean_tokens"] > 0 and row["records"] > 0
        assert all(level in report[mode]["table"] for level in (*LEVELS, "overall"))
    assert set(report["times"]) == {"data", "coldstart", "aepo", "eval"}
    assert "cold start" in res.stdout and "after AEPO" in res.stdout and "stage times" in res.stdout
