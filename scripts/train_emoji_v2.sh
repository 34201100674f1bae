#!/usr/bin/env bash
# Reproduce emoji-v2 (the v2 image tokenizer and the v2 generators on its codes) on 2 CPU cores.
#   bash scripts/train_emoji_v2.sh [RUNS_DIR] [MODEL_DIR]
# The text tokenizer and the encoder (and its memory) are emoji-small's. Stages resume (training) or skip
# (built outputs), so an interrupted run continues where it stopped. Times measured on this project's 2-core
# machine: the tokenizer 40 min on both cores and its decoder 22 min on one; each generator ~2.5 h on one core, the two side by side.
set -euo pipefail
RUNS=${1:-runs}
MODEL=${2:-src/racm3/pretrained/emoji-v2}
SHIPPED=src/racm3/pretrained/emoji-small
DATA=$RUNS/data/emoji
mkdir -p "$RUNS"

[ -f "$DATA/docs.jsonl" ] || racm3 data emoji "$DATA"
# FSQ 8-8-8-6-5 at 16x16 codes, pixel + perceptual losses, 6,500 steps; then its decoder alone (the codes stay)
racm3 train image-tokenizer "$DATA" "$RUNS/tok-v2-64" --preset v2-64 --resume
racm3 train image-tokenizer "$DATA" "$RUNS/tok-v2-64-decoder" --preset v2-64-decoder --init-from "$RUNS/tok-v2-64" --resume
racm3 train assemble "$MODEL" --text-tokenizer "$SHIPPED/text_tokenizer" --image-tokenizer "$RUNS/tok-v2-64-decoder" \
  --encoder "$SHIPPED/encoder"
[ -f "$RUNS/memory/memory.json" ] || racm3 memory build "$DATA" "$RUNS/memory" --encoder "$MODEL/encoder"
# v2-small: emoji-small's width and depth, a 1,024-token context, the factorized image head; the v2 recipe.
# One thread each, side by side; RA-CM3 and the no-retrieval baseline see about the same number of tokens
# (k=0 sequences are about half as long).
# The RA generator's caption after its image continues the image's positions (preset v2-small-aligned: caption
# copy benefit 1.31 nats at step 1,000 against 0.04 with v2-small); the baseline has no context to copy from.
racm3 train generator "$DATA" "$RUNS/memory" "$RUNS/gen-v2-ra" --tokenizers "$MODEL" --encoder "$MODEL/encoder" \
  --preset v2-small-aligned --steps 1000 --batch-size 16 --threads 1 --snapshot-every 200 --eval-every 50 --resume &
ra=$!
racm3 train generator "$DATA" "$RUNS/memory" "$RUNS/gen-v2-k0" --tokenizers "$MODEL" --encoder "$MODEL/encoder" \
  --preset v2-small --k 0 --steps 1000 --batch-size 32 --threads 1 --snapshot-every 200 --eval-every 50 --resume &
k0=$!
wait $ra && wait $k0  # a failed training stops here, before anything is assembled
racm3 train assemble "$MODEL" --generator "$RUNS/gen-v2-ra" --baseline "$RUNS/gen-v2-k0" --image-temperature 0.5
du -sh "$MODEL"/*
