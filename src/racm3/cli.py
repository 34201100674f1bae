"""The `racm3` command: one subcommand per stage, in data-flow order (data -> memory -> train -> generate -> eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import racm3

# Heavy libraries (torch, faiss, transformers) are imported inside each command, so `racm3 --help` is instant.
app = typer.Typer(help="RA-CM3: retrieval-augmented multimodal generation, images from text and text from images.",
                  no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Build data sets (docs.jsonl + images/).", no_args_is_help=True)
memory_app = typer.Typer(help="Build, change and search a retrieval memory.", no_args_is_help=True)
train_app = typer.Typer(help="Train the components: tokenizers, encoder image tower, generator.", no_args_is_help=True)
generate_app = typer.Typer(help="Generate images from text and text from images.", no_args_is_help=True)
eval_app = typer.Typer(help="Measure retrieval, tokenizers and generation.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(memory_app, name="memory")
app.add_typer(train_app, name="train")
app.add_typer(generate_app, name="generate")
app.add_typer(eval_app, name="eval")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"racm3 {racm3.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """RA-CM3: retrieval-augmented multimodal generation."""


# --- data --------------------------------------------------------------------------------------


@data_app.command("emoji")
def data_emoji(
    out_dir: Path = typer.Argument(..., help="Folder to write docs.jsonl and images/ into."),
    size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed of the train/held-out split by concept."),
    styles: str = typer.Option("twemoji,openmoji", help="Comma-separated art styles: twemoji, openmoji, noto."),
) -> None:
    """Build the embedded emoji data set: every emoji in two art styles, captioned with its CLDR name."""
    from collections import Counter

    from racm3.datasets.emoji import iter_emoji_documents, make_style
    from racm3.documents import write_jsonl_dataset

    stats: Counter = Counter()
    chosen = tuple(s.strip() for s in styles.split(",") if s.strip())
    for style in chosen:  # fail before writing anything
        try:
            make_style(style)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--styles") from None
    n = write_jsonl_dataset(iter_emoji_documents(size=size, seed=seed, styles=chosen, stats=stats), out_dir)
    for style in chosen:
        typer.echo(f"{style:10s} train {stats[(style, 'train')]:5d}  heldout {stats[(style, 'heldout')]:5d}"
                   f"  (not drawn in this style: {stats[(style, 'missing')]})")
    typer.echo(f"wrote {n} documents to {out_dir / 'docs.jsonl'}")

# --- memory ------------------------------------------------------------------------------------

# --- train -------------------------------------------------------------------------------------


def _tokenizer_error(message: str) -> None:
    """Print a user-actionable error and exit 1 (tokenizer commands)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@train_app.command("image-tokenizer")
def train_image_tokenizer_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (docs.jsonl + images/); only split == 'train' is used."),
    out_dir: Path = typer.Argument(..., help="Where the tokenizer goes (config.json + model.safetensors + checkpoint.pt)."),
    preset: str = typer.Option("emoji-8x8", help="Architecture preset: tiny, emoji-8x8, emoji-16x16."),
    steps: int = typer.Option(2000, help="Optimiser steps in total (a resumed run continues up to this)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (warm-up, then cosine decay)."),
    seed: int = typer.Option(0, help="Random seed (initialisation and batches)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT_DIR/checkpoint.pt."),
) -> None:
    """Train the VQ image tokenizer (reconstruction L2 + L1 + commitment); progress bar, checkpoints, resume."""
    from racm3.tokenizers.image_train import ImageTrainConfig, train_image_tokenizer

    try:
        cfg = ImageTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads)
        summary = train_image_tokenizer(dataset_dir, out_dir, preset, cfg, resume=resume)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        _tokenizer_error(str(exc))
    typer.echo(f"saved image tokenizer ({summary['preset']}, {summary['steps']} steps, "
               f"{summary['elapsed_s']:.0f} s of training) to {out_dir}")


@train_app.command("text-tokenizer")
def train_text_tokenizer_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (docs.jsonl + images/); train split captions are used."),
    out_dir: Path = typer.Argument(..., help="Where tokenizer.json goes."),
    vocab_size: int = typer.Option(2048, help="BPE vocabulary size (256 bytes + merges)."),
) -> None:
    """Train the byte-level BPE text tokenizer on the train split's captions."""
    from racm3.readers import read_jsonl_dataset
    from racm3.tokenizers.text import TextTokenizer

    try:
        texts = [t for d in read_jsonl_dataset(dataset_dir) if d.meta.get("split") == "train" for t in d.texts]
        if not texts:
            _tokenizer_error(f"{dataset_dir}: no captions in the train split")
        tok = TextTokenizer.train(texts, vocab_size=vocab_size)
    except (FileNotFoundError, ValueError) as exc:
        _tokenizer_error(str(exc))
    path = tok.save_pretrained(out_dir)
    typer.echo(f"trained on {len(texts)} captions: {tok.vocab_size} tokens, saved {path}")


# --- generate ----------------------------------------------------------------------------------

# --- eval --------------------------------------------------------------------------------------


@eval_app.command("image-tokenizer")
def eval_image_tokenizer_cmd(
    tokenizer_dir: Path = typer.Argument(..., help="An image tokenizer folder (config.json + model.safetensors)."),
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (docs.jsonl + images/)."),
    split: str = typer.Option("heldout", "--split", help="Images of this split ('all' for every one)."),
    rfid: bool = typer.Option(True, "--rfid/--no-rfid", help="Compute rFID (Inception on CPU: minutes)."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """PSNR, codebook usage, tokens per image and rFID of the image tokenizer's reconstructions."""
    import json

    import torch

    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.image_train import evaluate_image_tokenizer, load_split_images

    torch.set_num_threads(threads)
    try:
        tok = ImageTokenizer.from_pretrained(tokenizer_dir)
        images = load_split_images(dataset_dir, None if split == "all" else split, tok.image_size, limit)
    except (FileNotFoundError, ValueError) as exc:
        _tokenizer_error(str(exc))
    result = evaluate_image_tokenizer(tok, images, rfid=rfid)
    result["split"] = split
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


# --- demo --------------------------------------------------------------------------------------
