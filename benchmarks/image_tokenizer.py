"""Image tokenizer quality on held-out emoji: PSNR, codebook usage, rFID per tokenizer, plus a reconstruction sheet.

Usage: python benchmarks/image_tokenizer.py DATASET_DIR TOKENIZER_DIR [TOKENIZER_DIR ...] [--no-rfid] [--out NAME]
Prints a table, writes benchmarks/results/NAME.json and NAME_recon.png (NAME: image_tokenizer by default; the
sheet has the originals in the top row, then each tokenizer's reconstructions: the picture the README shows).
rFID: 800 held-out images against their reconstructions; the originals' Inception features are computed once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from racm3.tokenizers.image import ImageTokenizer
from racm3.tokenizers.image_train import evaluate_image_tokenizer, load_split_images

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str]) -> None:
    rfid = "--no-rfid" not in argv
    if "--out" in argv and argv.index("--out") + 1 >= len(argv):
        raise SystemExit("--out needs a NAME (results go to benchmarks/results/NAME.json)")
    name = argv[argv.index("--out") + 1] if "--out" in argv else "image_tokenizer"
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and not (i and argv[i - 1] == "--out")]
    if len(args) < 2:
        raise SystemExit(__doc__)
    dataset, dirs = args[0], args[1:]
    torch.set_num_threads(1)
    tokenizers = [ImageTokenizer.from_pretrained(d) for d in dirs]
    if len({t.image_size for t in tokenizers}) > 1:
        raise SystemExit("the tokenizers take different image sizes; compare those of one size in one run")
    images = load_split_images(dataset, "heldout", image_size=tokenizers[0].image_size)
    rows, sheet_rows = [], [images[::100][:16]]
    for d, tok in zip(dirs, tokenizers):
        t0 = time.time()
        res = evaluate_image_tokenizer(tok, images, rfid=rfid, rfid_images=800)
        log = Path(d) / "train_log.jsonl"
        train_s = json.loads(log.read_text().splitlines()[-1])["elapsed_s"] if log.is_file() else None
        rows.append({"tokenizer": d, **res, "grid": list(tok.grid), "codebook_size": tok.codebook_size,
                     "quantizer": tok.config.quantizer, "parameters": sum(p.numel() for p in tok.parameters()),
                     "train_s": train_s, "eval_s": round(time.time() - t0, 1)})
        with torch.no_grad():
            sheet_rows.append((tok.decode(tok.encode(sheet_rows[0].float() / 255)) * 255).round().to(torch.uint8))
    print(f"{'tokenizer':40s} {'grid':>6s} {'psnr':>7s} {'usage':>6s} {'rfid':>7s} {'train_s':>8s}")
    for r in rows:
        print(f"{r['tokenizer']:40s} {r['grid'][0]:>3d}x{r['grid'][1]:<2d} {r['psnr']:7.2f} {r['codebook_usage']:6.3f} "
              f"{r['rfid'] if r['rfid'] is not None else float('nan'):7.2f} {r['train_s'] or float('nan'):8.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    grid = torch.cat([torch.cat(list(r), dim=2) for r in sheet_rows], dim=1)  # [3, rows*64, 16*64]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(RESULTS / f"{name}_recon.png")


if __name__ == "__main__":
    main(sys.argv[1:])
