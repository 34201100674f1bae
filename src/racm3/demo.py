"""`racm3 demo`: captions -> images and images -> captions, each shown with its sources, as HTML: on the emoji set
and its memory, or on a data set and memory of one's own."""

from __future__ import annotations

import html
import random
import time
from pathlib import Path

from racm3.documents import Document

PER_DIRECTION = 8  # half of them from held-out concepts: knowledge only the memory holds


def pick_prompts(docs: list[Document], n: int = PER_DIRECTION, seed: int = 0) -> list[Document]:
    """n documents, half train and half held-out concepts, both styles; fewer where a split has fewer documents.
    Where enough captions are their concept's plain name (the emoji's without a skin-tone qualifier: n/2 concepts
    in each split), only those; else any captioned image (an icon's "document print preview")."""
    rng = random.Random(seed)
    captioned = [d for d in docs if d.text and d.image is not None]
    named = [d for d in captioned if d.text == d.concept]
    enough = all(len({d.concept for d in named if d.split == s}) >= n // 2 for s in ("train", "heldout"))
    plain = named if enough else captioned
    out: list[Document] = []
    for split in ("train", "heldout"):
        pool = sorted((d for d in plain if d.split == split), key=lambda d: d.id)
        out += rng.sample(pool, min(n // 2, len(pool)))
    if not out:
        raise ValueError("the data set has no captioned image documents with a train or heldout split to prompt with; "
                         "give a data set with a split field, such as the data/ of a `racm3 train all` run")
    return out


def _img(images_dir: Path, name: str, image, size: int = 64) -> str:
    path = images_dir / f"{name}.png"
    image.save(path)
    return f'<img src="images/{path.name}" width="{size}" height="{size}" alt="{html.escape(name)}">'


def _sources_html(images_dir: Path, prefix: str, sources) -> str:
    cells = []
    for j, h in enumerate(sources):
        thumb = _img(images_dir, f"{prefix}-src{j}", h.document.image, 48) if h.document.image is not None else ""
        score = "demo" if h.score is None else f"{h.score:.3f}"
        cells.append(f'<div class="src">{thumb}<br><small>{html.escape(h.document.text or "")}<br>'
                     f'{html.escape(h.id)} · {score}</small></div>')
    return "".join(cells) or "<small>none</small>"


def summary_sheet(rows: list[tuple[str, list, object, object]], path: Path, cell: int = 64) -> None:
    """A PNG of caption->image rows: label, source thumbnails, generated image, reference (for the README)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    label_w, pad = 260, 6
    width = label_w + (2 + 2) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, len(rows) * (cell + pad) + pad + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for x, head in ((label_w, "retrieved sources"), (label_w + 2 * (cell + pad), "generated"),
                    (label_w + 3 * (cell + pad), "reference")):
        draw.text((x, 2), head, fill="black", font=font)
    for r, (label, sources, generated, reference) in enumerate(rows):
        y = 20 + pad + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 8), label, fill="black", font=font)
        for j, img in enumerate(sources[:2] + [None] * (2 - len(sources[:2])) + [generated, reference]):
            if img is not None:
                sheet.paste(img.resize((cell, cell)), (label_w + j * (cell + pad), y))
    sheet.save(path)


def run_demo(out_dir: Path, model_dir: Path | None = None, k: int = 2, samples: int = 8, log=print,
             dataset_dir: Path | None = None, memory_dir: Path | None = None) -> Path:
    """Build what is missing (data set, memory), generate both ways, write out_dir/index.html; returns its path.

    dataset_dir / memory_dir default to the emoji set and its memory in the user cache (built on first use).
    """
    from racm3.embedded import ensure_emoji_dataset, ensure_emoji_memory
    from racm3.pipeline import RACM3
    from racm3.readers import read_documents
    from racm3.retrieval.memory import Memory

    t0 = time.perf_counter()
    model = RACM3.from_pretrained(model_dir)
    docs = list(read_documents(dataset_dir or ensure_emoji_dataset(log=log)))
    memory = Memory.open(memory_dir or ensure_emoji_memory(model.encoder, log=log))
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows_img, rows_txt, sheet_rows = [], [], []
    for i, d in enumerate(pick_prompts(docs)):
        res = model.generate_image(d.text, memory=memory, k=k, num_samples=samples, seed=i)
        log(f"image for {d.text!r} ({d.split}) in {res.seconds:.1f} s")
        sheet_rows.append((f"{d.text} ({d.split})", [h.document.image for h in res.sources], res.image, d.image))
        rows_img.append(f"<tr><td>{html.escape(d.text)}<br><small>{d.split}</small></td>"
                        f"<td>{_sources_html(images_dir, f'i{i}', res.sources)}</td>"
                        f"<td>{_img(images_dir, f'i{i}-out', res.image, 128)}</td>"
                        f"<td>{_img(images_dir, f'i{i}-truth', d.image, 64)}</td></tr>")
    for i, d in enumerate(pick_prompts(docs, seed=1)):
        res = model.generate_text(d.image, memory=memory, k=k, seed=i)
        log(f"caption for {d.id} ({d.split}) in {res.seconds:.1f} s: {res.text!r}")
        ok = "✓" if res.text.lower() == d.text.lower() else ""
        rows_txt.append(f"<tr><td>{_img(images_dir, f't{i}-in', d.image, 64)}<br><small>{d.split}</small></td>"
                        f"<td>{_sources_html(images_dir, f't{i}', res.sources)}</td>"
                        f"<td><b>{html.escape(res.text)}</b> {ok}</td><td>{html.escape(d.text)}</td></tr>")
    memory.close()
    summary_sheet(sheet_rows, out_dir / "summary.png")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>racm3 demo</title><style>
body{{font-family:sans-serif;margin:2em}} td{{padding:6px;border-bottom:1px solid #ddd;vertical-align:middle}}
.src{{display:inline-block;text-align:center;margin:0 8px;width:150px}} img{{image-rendering:pixelated}}
</style></head><body><h1>racm3 demo</h1>
<p>RA-CM3 on {"the embedded emoji memory" if memory_dir is None else html.escape(str(memory_dir))} ({len(docs)} documents), k={k}. Held-out concepts were never seen by the
generator in training: what it draws or names for them comes from the retrieved sources.</p>
<p><img src="summary.png" alt="caption to image summary"></p>
<h2>Caption → image</h2><table><tr><th>caption</th><th>retrieved sources (score)</th><th>generated</th>
<th>reference</th></tr>{''.join(rows_img)}</table>
<h2>Image → caption</h2><table><tr><th>image</th><th>retrieved sources (score)</th><th>generated caption</th>
<th>reference</th></tr>{''.join(rows_txt)}</table>
<p><small>{time.perf_counter() - t0:.0f} s on this machine.{" Artwork: Twemoji (CC-BY 4.0), OpenMoji (CC-BY-SA 4.0)." if dataset_dir is None else ""}</small></p>
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
