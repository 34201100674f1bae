#!/usr/bin/env bash
# Reproduce the shipped model emoji-small from nothing on 2 CPU cores (about 2 hours on an idle machine).
#   bash scripts/train_emoji_small.sh [RUNS_DIR] [MODEL_DIR]
# Stages resume (training) or skip (built outputs), so an interrupted run continues where it stopped.
set -euo pipefail
RUNS=${1:-runs}
MODEL=${2:-src/racm3/pretrained/emoji-small}
DATA=$RUNS/data/emoji
mkdir -p "$RUNS"

[ -f "$DATA/docs.jsonl" ] || racm3 data emoji "$DATA"
[ -f "$RUNS/text_tokenizer/tokenizer.json" ] || racm3 train text-tokenizer "$DATA" "$RUNS/text_tokenizer"
# The shipped VQ and image tower were trained in float32 (the runtime's default is bf16 autocast on this CPU).
racm3 train image-tokenizer "$DATA" "$RUNS/vq-8x8" --preset emoji-8x8 --steps 1500 --precision fp32 --resume
racm3 train encoder "$DATA" "$RUNS/encoder" --epochs 45 --precision fp32 --resume
# The generators must see image codes exactly as the shipped (float16) VQ gives them: assemble it first.
racm3 train assemble "$MODEL" --text-tokenizer "$RUNS/text_tokenizer" --image-tokenizer "$RUNS/vq-8x8" \
  --encoder "$RUNS/encoder"
[ -f "$RUNS/memory/memory.json" ] || racm3 memory build "$DATA" "$RUNS/memory" --encoder "$MODEL/encoder"
# RA-CM3 and the no-retrieval baseline see about the same number of tokens (k=0 sequences are ~3x shorter).
# --recipe v1: the shipped model's lesson shares (the default is the v2 recipe; docs/design.md has both).
racm3 train generator "$DATA" "$RUNS/memory" "$RUNS/gen-ra" --tokenizers "$MODEL" --encoder "$MODEL/encoder" \
  --recipe v1 --steps 1200 --batch-size 24 --threads 1 --snapshot-every 200 --resume &
ra=$!
racm3 train generator "$DATA" "$RUNS/memory" "$RUNS/gen-k0" --tokenizers "$MODEL" --encoder "$MODEL/encoder" \
  --recipe v1 --k 0 --steps 1200 --batch-size 64 --threads 1 --snapshot-every 200 --resume &
k0=$!
wait $ra && wait $k0  # a failed training stops here, before anything is assembled
racm3 train assemble "$MODEL" --generator "$RUNS/gen-ra" --baseline "$RUNS/gen-k0"
du -sh "$MODEL"/*
