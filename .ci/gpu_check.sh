#!/usr/bin/env bash
# Issue 12's check on one GPU (a few minutes; run where a GPU is lent): the used-by command's path at world size 1,
# i.e. torchrun with the cpu:gloo,cuda:nccl process group, cold start then AEPO on the tiny model (DDP, then
# --fsdp with --resume from its own checkpoint), then one AEPO step of every model family the README names.
# SMOKE_ONLY=1 stops after the cold start and the first AEPO run. (.ci/device_check.sh, the prepared device call,
# does not run this script: its `paths` step covers the bf16, accumulation and --fsdp paths in less device time.)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/ares_gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU: a CPU run\")"
python data_prep.py demo --out "$OUT/data" --sft 64 --pool 8 --rl 32 --test 8 >/dev/null
run() { torchrun --standalone --nproc_per_node=1 ares.py --dist-timeout 120 "$@" 2>&1 | grep -vE "it/s\]|Loading weights|Writing model"; }
AEPO=(--stage aepo --log-samples-every 0 --data "$OUT/data/rl.jsonl" --batch-size 4 --group-size 4 --max-response-len 32 --minibatches 2 --keep-uniform-groups)
run --stage coldstart --model tiny --data "$OUT/data/sft.jsonl" --out "$OUT/cold" --steps 4 --batch-size 8
run "${AEPO[@]}" --model "$OUT/cold/final" --out "$OUT/aepo_ddp" --steps 2
if [ "${SMOKE_ONLY:-0}" = 1 ]; then  # the smoke run alone (cold start + AEPO; tests/test_bench.py runs it)
  tail -n 1 "$OUT"/aepo_ddp/metrics.jsonl | cut -c1-200
  exit 0
fi
run "${AEPO[@]}" --model "$OUT/cold/final" --out "$OUT/aepo_fsdp" --steps 1 --fsdp
run "${AEPO[@]}" --model "$OUT/cold/final" --out "$OUT/aepo_fsdp" --steps 2 --fsdp --resume
python - "$OUT" <<'PY'
import sys
sys.path.insert(0, "tests")
from test_families import FAMILIES, tiny_model
for family in FAMILIES:
    model, processor = tiny_model(family)
    model.save_pretrained(f"{sys.argv[1]}/{family}")
    processor.save_pretrained(f"{sys.argv[1]}/{family}")
PY
for family in qwen2_vl qwen2_5_vl qwen3_vl; do
  run "${AEPO[@]}" --model "$OUT/$family" --out "$OUT/aepo_$family" --steps 1 --window 2 --entropy-quantile 0.5
done
python - "$OUT" <<'PY'
import json, random, sys
rows = [dict(json.loads(line), images=[]) for line in open(f"{sys.argv[1]}/data/rl.jsonl")]
open(f"{sys.argv[1]}/data/rl_text.jsonl", "w").writelines(json.dumps(r) + "\n" for r in rows)
PY
for family in qwen2 qwen3; do
  run "${AEPO[@]}" --data "$OUT/data/rl_text.jsonl" --model "$OUT/$family" --out "$OUT/aepo_$family" --steps 1 --window 2 --entropy-quantile 0.5
done
tail -n 1 "$OUT"/aepo_*/metrics.jsonl | cut -c1-200
