#!/usr/bin/env bash
# Reproduce emoji-v2 (the v2 image tokenizer and the v2 generators on its codes) on 2 CPU cores: `racm3 train all`
# with the emoji-v2 pipeline (src/racm3/pipelines/emoji-v2.json: emoji-small's text tokenizer and encoder, and so
# its memory; v2-64 then its decoder alone; the v2-small-aligned RA generator and the v2-small baseline, 1,000
# steps, side by side), then its model folder written into MODEL_DIR. Times measured on this project's 2-core
# machine: the tokenizer 40 min on both cores and its decoder 22 min on one; each generator ~2.5 h on one core,
# the two side by side.
#   bash scripts/train_emoji_v2.sh [RUNS_DIR] [MODEL_DIR] [TRAIN_ALL_OPTIONS...]
# Every stage skips (done) or resumes (cut short), so an interrupted run continues where it stopped.
set -euo pipefail
RUNS=${1:-runs}
MODEL=${2:-src/racm3/pretrained/emoji-v2}
shift $(( $# < 2 ? $# : 2 ))
OUT=$RUNS/emoji-v2

[ -f "$RUNS/data/emoji/docs.jsonl" ] || racm3 data emoji "$RUNS/data/emoji"
racm3 train all "$RUNS/data/emoji" "$OUT" --pipeline emoji-v2 "$@"
racm3 train assemble "$MODEL" --text-tokenizer "$OUT/model/text_tokenizer" --image-tokenizer "$OUT/model/image_tokenizer" \
  --encoder "$OUT/model/encoder" --generator "$OUT/model/generator" --baseline "$OUT/model/generator_k0"
cp "$OUT/model/sampling.json" "$MODEL/sampling.json"  # the pipeline's sampling temperatures (images at 0.5)
du -sh "$MODEL"/*
