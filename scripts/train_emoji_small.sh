#!/usr/bin/env bash
# Reproduce the shipped model emoji-small from nothing on 2 CPU cores (about 2 hours on an idle machine):
# `racm3 train all` with the emoji-small pipeline (src/racm3/pipelines/emoji-small.json: the 8x8 VQ and the
# image tower in float32, the v1 recipe, emoji-small generators for 1,200 steps, the two side by side), then its
# model folder written into MODEL_DIR.
#   bash scripts/train_emoji_small.sh [RUNS_DIR] [MODEL_DIR] [TRAIN_ALL_OPTIONS...]
# e.g. `bash scripts/train_emoji_small.sh /tmp/trial /tmp/trial/model --steps-scale 0.01` for a trial of minutes.
# Every stage skips (done) or resumes (cut short), so an interrupted run continues where it stopped.
set -euo pipefail
RUNS=${1:-runs}
MODEL=${2:-src/racm3/pretrained/emoji-small}
shift $(( $# < 2 ? $# : 2 ))
OUT=$RUNS/emoji-small

[ -f "$RUNS/data/emoji/docs.jsonl" ] || racm3 data emoji "$RUNS/data/emoji"
racm3 train all "$RUNS/data/emoji" "$OUT" --pipeline emoji-small "$@"
racm3 train assemble "$MODEL" --text-tokenizer "$OUT/model/text_tokenizer" --image-tokenizer "$OUT/model/image_tokenizer" \
  --encoder "$OUT/model/encoder" --generator "$OUT/model/generator" --baseline "$OUT/model/generator_k0"
du -sh "$MODEL"/*
