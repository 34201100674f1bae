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

# --- generate ----------------------------------------------------------------------------------

# --- eval --------------------------------------------------------------------------------------

# --- demo --------------------------------------------------------------------------------------
