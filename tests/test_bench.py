"""bench.py --size tiny: the same benchmark code that runs Qwen2.5-VL-3B/7B on a GPU, run on the CPU at tiny size.
Timings on a shared CPU are noise; what is checked is that every number is there, is sane, and that EOS
suppression really made every rollout row run its full length."""
import json
import math

from conftest import run_script


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_tiny_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    new_tokens = 16
    res = run_script(["bench.py", "--size", "tiny", "--out", out, "--batches", "8", "--new-tokens", new_tokens,
                      "--repeats", "1", "--update-tokens", "512", "--update-rows", "2", "--update-repeats", "1",
                      "--aepo-steps", "2", "--aepo-new-tokens", "16"], timeout=300)
    assert "rollout 8 x 16" in res.stdout and "AEPO step" in res.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["device"].startswith("cpu") and data["meta"]["compile_static"] is False
    tiny = data["results"]["tiny"]
    assert positive(tiny["device"]["bandwidth_bytes_per_s"]) and positive(tiny["device"]["matmul_peak_flops"])
    assert tiny["params"]["total"] == tiny["params"]["vision"] + tiny["params"]["trainable"]

    (rollout,) = tiny["rollout"]
    assert rollout["batch"] == 8 and rollout["new_tokens"] == new_tokens and rollout["image_tokens"] == 16
    assert positive(rollout["bound_tokens_per_s"]) and positive(rollout["prompt_tokens"])
    assert set(rollout["methods"]) == {"eager", "static", "generate"}
    for name, m in rollout["methods"].items():
        assert "error" not in m, (name, m)
        assert positive(m["tokens_per_s"]) and positive(m["seconds"]) and positive(m["prefill_s"]), (name, m)
        assert m["tokens"] == 8 * new_tokens and m["full_length"] and m["min_length"] == new_tokens, (name, m)
        assert 0 < m["bound_fraction"] < 1 and positive(m["vs_generate"]), (name, m)
    for name in ("eager", "static"):  # what ares.sample returns beyond the tokens
        m = rollout["methods"][name]
        assert m["finite_logprobs"] and 0 < m["mean_entropy"] <= math.log(512), (name, m)
    # fp32 on a CPU, same noise per row and step: the static-cache path samples exactly what the eager one does
    assert rollout["methods"]["static"]["same_tokens_as_eager"] == 1.0

    update = tiny["update"]
    assert "error" not in update, update
    assert update["rows"] == 2 and 400 <= update["tokens"] <= 512 and update["master_dtype"] == "float32"
    assert positive(update["tokens_per_s"]) and positive(update["model_flops"]) and 0 < update["mfu"] < 1.5

    aepo = tiny["aepo"]
    assert set(aepo) == {"branching", "no_branching"}  # no --trl
    for name, step in aepo.items():
        assert step["steps"] == 2 and len(step["per_step"]) == 2, (name, step)
        assert positive(step["seconds_per_step"]) and positive(step["rollout_tokens_per_s"]), (name, step)
        assert math.isclose(step["seconds_per_step"], step["sample_s"] + step["score_s"] + step["update_s"])
        assert 0 < step["mean_len"] <= 16 and step["kl_coef"] == 0.01
    assert aepo["branching"]["branch_samples"] == 4 and aepo["no_branching"]["branch_samples"] == 0
    assert aepo["no_branching"]["branches"] == 0
