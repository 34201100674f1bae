#!/usr/bin/env bash
# On a machine with a CUDA GPU: the install, the GPU tests, the training step's speed (tokens/s, MFU) and a
# 3-minute training run of the ~27M 'medium' preset on the emoji data. About 8 minutes in all.
#   bash scripts/gpu_check.sh [OUT_DIR]        (results: OUT_DIR/*.json, OUT_DIR/*.log)
# Install first with a CUDA build of torch (README, "Training on a GPU").
set -uo pipefail
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
python - <<'PY' | tee "$OUT/device.log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB",
          "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
PY
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -n 20 | tee "$OUT/gpu_tests.log"
python benchmarks/training_speed.py --device cuda --preset medium --steps 20 --out "$OUT/training_speed_cuda.json" \
  2>&1 | tee "$OUT/training_speed.log"
# 3 minutes of real training: data, memory (encoder on the GPU), then the generator until the time is up.
DATA=$OUT/data/emoji
[ -f "$DATA/docs.jsonl" ] || racm3 data emoji "$DATA" > /dev/null
[ -f "$OUT/memory/memory.json" ] || racm3 memory build "$DATA" "$OUT/memory" 2>&1 | tail -n 1
rm -rf "$OUT/gen-medium"
timeout 180 racm3 train generator "$DATA" "$OUT/memory" "$OUT/gen-medium" --preset medium --device cuda \
  --batch-size 64 --steps 20000 --lr 6e-4 > "$OUT/train_medium.log" 2>&1
python - "$OUT" <<'PY' | tee "$OUT/train_medium_summary.log"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "gen-medium" / "train_log.jsonl").read_text().splitlines()]
speed = json.loads((out / "training_speed_cuda.json").read_text())
last = rows[-1]
print(f"medium preset, 3 minutes: step {last['step']}, loss {last['loss']:.3f}, {last['tokens_per_s']:.0f} tokens/s;"
      f" best benchmark row: " + max(speed["rows"], key=lambda r: r["tokens_per_s"])["variant"]
      + f", MFU {max(r['mfu'] for r in speed['rows']):.1%} of {speed['bf16_matmul_gflops']:.0f} GFLOP/s bf16")
PY
