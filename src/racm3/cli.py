"""The `racm3` command: one subcommand per stage, in data-flow order (data -> memory -> train -> generate -> eval)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

import racm3
from racm3.limits import MAX_GUIDANCE, MAX_SAMPLES, MAX_SEARCH_K, MAX_SEED, TEMPERATURE_RULE, temperature_ok

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
    import os

    import sys

    # transformers draws a progress bar for every small checkpoint it loads or saves: noise on a command line
    # (and a second line in a one-line error). The variables reach a transformers imported later; one already
    # imported (a test process, a notebook) is told directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


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
    with _user_errors():  # an OUT_DIR that is a file
        n = write_jsonl_dataset(iter_emoji_documents(size=size, seed=seed, styles=chosen, stats=stats), out_dir)
    for style in chosen:
        typer.echo(f"{style:10s} train {stats[(style, 'train')]:5d}  heldout {stats[(style, 'heldout')]:5d}"
                   f"  (not drawn in this style: {stats[(style, 'missing')]})")
    typer.echo(f"wrote {n} documents to {out_dir / 'docs.jsonl'}")


@data_app.command("icons")
def data_icons(
    out_dir: Path = typer.Argument(..., help="Folder to write docs.jsonl and images/ into."),
    themes: str = typer.Option("tango,gnome,oxygen", help="Comma-separated icon themes (folder names in --icons-dir)."),
    icons_dir: Path = typer.Option(Path("/usr/share/icons"), help="Where the freedesktop icon themes are installed."),
    size: int = typer.Option(64, min=8, help="Image side in pixels: from a theme's PNG of this size, else the nearest "
                                             "larger (downscaled), else its largest if at least half the size "
                                             "(upscaled); a theme with only smaller ones does not draw the name."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N icon names (in name order)."),
) -> None:
    """Build the icon data set: each icon name drawn by two or more desktop icon themes, captioned with the name."""
    from collections import Counter

    from racm3.datasets.icons import iter_icon_documents
    from racm3.documents import write_jsonl_dataset

    stats: Counter = Counter()
    chosen = tuple(t.strip() for t in themes.split(",") if t.strip())
    with _user_errors():  # an unknown theme fails before anything is written; so does an OUT_DIR that is a file
        docs = iter_icon_documents(icons_dir, chosen, size=size, limit=limit, stats=stats)
        n = write_jsonl_dataset(docs, out_dir)
    for theme in (t.lower() for t in chosen):
        typer.echo(f"{theme:10s} train {stats[(theme, 'train')]:5d}  heldout {stats[(theme, 'heldout')]:5d}"
                   f"  (upscaled: {stats[(theme, 'upscaled')]}, aliases merged: {stats[(theme, 'alias')]},"
                   f" too small: {stats[(theme, 'too small')]},"
                   f" unreadable or not square: {stats[(theme, 'unreadable')]})")
    typer.echo(f"{stats['names']} icon names drawn by at least two themes ({stats['names in all themes']} by all "
               f"{len(chosen)}); {stats['lone']} dropped with one readable drawing")
    typer.echo(f"wrote {n} documents to {out_dir / 'docs.jsonl'}")

# --- memory ------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _user_errors(key_hint: str = ""):
    """The one place a command's errors become its one line on stderr and exit 1.

    What the library raises for a user's input says what to fix: ValueError and its kinds (a bad option, a bad
    record, a broken model folder, a device this machine lacks, an unreadable checkpoint), a missing file, a run
    folder that needs --resume, a memory folder that cannot be used (MemoryFolderError), an unknown id
    (KeyError, printed without its quotes, followed by key_hint), a training process that was killed
    (ChildProcessError: out of memory, or a user). Anything else is a bug and keeps its traceback.
    """
    from racm3.retrieval.memory import MemoryFolderError

    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, MemoryFolderError, ChildProcessError) as exc:
        if isinstance(exc, KeyError):
            _fail(f"{exc.args[0] if exc.args else exc}{key_hint}")
        _fail(str(exc))


MEMORY_WAIT_S = 300.0  # racm3.retrieval.memory.DEFAULT_WAIT (not imported here: `racm3 --help` stays instant)
MEMORY_HELP = "A memory folder, or a milvus: URI (milvus:///path/to/memory.db, milvus://host:19530/collection)."
WAIT_HELP = ("Seconds to wait while another process writes this memory (one writer at a time), then fail; "
             "0: fail at once.")


def _add_dataset(open_memory, encoder, dataset_dir: Path, label: str, strict: bool = False):
    """Read every document of dataset_dir, then embed them into open_memory() with a progress bar, in one write.

    Returns (memory, how many were added); a failed write closes the memory. Nothing is created or written before
    the whole data set has been read: a missing dataset leaves no memory folder. Bad records (corrupt or huge
    images, empty captions, missing files) are skipped and summarised on stderr, or stop the command at the first
    one with strict.
    """
    from tqdm import tqdm

    from racm3.documents import BadRecord
    from racm3.readers import ReadReport, read_documents

    report = ReadReport()
    try:
        docs = list(read_documents(dataset_dir, strict=strict, report=report))
    except BadRecord as exc:
        _fail(f"{exc} (--strict)")
    if report.skipped:
        typer.echo(report.summary(), err=True)
    memory = open_memory()
    with tqdm(total=len(docs), desc=label, unit="doc", delay=0.5) as bar:  # a quick refusal draws no bar
        try:
            return memory, memory.add_documents(docs, encoder, progress=bar.update)
        except BaseException:
            memory.close()
            raise


@memory_app.command("build")
def memory_build(
    dataset_dir: Path = typer.Argument(..., help="Dataset: docs.jsonl folder, Parquet, WebDataset shards, image folder."),
    memory_dir: str = typer.Argument(..., help="Memory folder (created if absent; documents added if present), or a "
                                          "milvus: URI (the [milvus] extra): milvus:///path/to/memory.db (Milvus "
                                          "Lite), milvus://host:19530/collection (a Milvus server)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="Encoder or model folder; default: the shipped one."),
    index: Optional[str] = typer.Option(None, "--index", help="flat (exact, the default), hnsw or ivfpq (approximate), "
                                        "or ivf-ondisk (a folder memory's: approximate, its lists in a file "
                                        "memory-mapped, so the memory need not fit in RAM)."),
    batch_size: int = typer.Option(512, "--batch-size", min=1, help="Documents per batch: each batch is one write."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes that embed (one torch thread each when "
                                "there are as many cores); this one reads and writes."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: only the documents whose id hashes to part I of "
                                        "N (build the parts on N machines, then `racm3 memory merge`)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 (about twice as fast where the CPU "
                                  "has bf16 units; vectors within cosine 0.9999 of fp32's)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record instead of skipping it."),
    wait: float = typer.Option(MEMORY_WAIT_S, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Embed a data set's documents into a memory, batch by batch: a killed build resumes when run again."""
    import time

    from tqdm import tqdm

    from racm3.documents import BadRecord
    from racm3.readers import ReadReport, read_documents
    from racm3.retrieval import load_encoder
    from racm3.retrieval.backends import open_or_create_memory
    from racm3.retrieval.build import Shard, build_memory

    t0 = time.perf_counter()
    report = ReadReport()
    with _user_errors():
        part = Shard.parse(shard) if shard else None
        import torch

        from racm3.runtime import resolve_precision

        resolve_precision(precision, torch.device("cpu"))  # a bad --precision fails before anything is made
        enc = load_encoder(encoder)
        docs = read_documents(dataset_dir, strict=strict, report=report)  # a missing data set fails here
        first = next(docs, None)  # ...or here: before the memory exists
        if first is None:
            if report.skipped:
                typer.echo(report.summary(), err=True)
            _fail(f"{dataset_dir}: no documents to add")
        mem = open_or_create_memory(memory_dir, enc.name, enc.dim, index=index or "flat", wait=wait)
        with mem:  # closed when done: a Milvus Lite memory's server stops with it
            if index is not None and mem.index_type != index:
                _fail(f"{memory_dir} already holds a {mem.index_type} index; drop --index or build a new memory")
            stream = _chain(first, docs)
            try:
                with tqdm(desc="embedding", unit="doc", delay=0.5) as bar:
                    result = build_memory(mem, stream, enc, batch_size, workers, encoder, part, bar.update,
                                          precision)
            except BadRecord as exc:
                _fail(f"{exc} (--strict; the batches before it are in {memory_dir}: fix the record and run the "
                      "same command to continue)")
            count = len(mem)
    if report.skipped:
        typer.echo(report.summary(), err=True)
    seconds = time.perf_counter() - t0
    typer.echo(f"added {result.added} documents to {memory_dir} ({count} in all, {mem.index_type} index) in "
               f"{seconds:.1f}s ({result.added / max(seconds, 1e-9):.0f} documents/s)"
               + (f"; skipped {result.skipped} already there or in other shards" if result.skipped else ""), err=True)


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


@memory_app.command("merge")
def memory_merge(
    memory_dir: str = typer.Argument(..., help="The memory to merge into (created if absent). " + MEMORY_HELP),
    parts: list[str] = typer.Argument(..., help="Memories to copy from (e.g. the --shard parts of a build)."),
    wait: float = typer.Option(MEMORY_WAIT_S, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Copy the documents of other memories (built with the same encoder) into one, with their stored vectors."""
    from tqdm import tqdm

    from racm3.retrieval.backends import open_memory, open_or_create_memory
    from racm3.retrieval.build import merge_memories

    with _user_errors(), contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_memory(p, wait=wait)) for p in parts]
        first = opened[0]
        out = stack.enter_context(open_or_create_memory(memory_dir, first.encoder_name, first.dim,
                                                        index=first.index_type, wait=wait))
        with tqdm(total=sum(len(m) for m in opened), desc="merging", unit="doc", delay=0.5) as bar:
            result = merge_memories(out, opened, progress=bar.update)
        count = len(out)
    typer.echo(f"merged {result.added} documents into {memory_dir} ({count} in all)"
               + (f"; {result.skipped} were already there" if result.skipped else ""), err=True)


@memory_app.command("add")
def memory_add(
    memory_dir: str = typer.Argument(..., help=MEMORY_HELP),
    dataset_dir: Path = typer.Argument(..., help="Documents to add (any reader format)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="The encoder that built the memory; default: shipped."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record instead of skipping it."),
    wait: float = typer.Option(MEMORY_WAIT_S, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Add documents to a memory without retraining anything: all of them or none (an id already there adds none)."""
    from racm3.retrieval import load_encoder
    from racm3.retrieval.backends import open_memory

    with _user_errors(), open_memory(memory_dir, wait=wait) as mem:
        enc = load_encoder(encoder)
        mem.require_encoder(enc.name)
        _, added = _add_dataset(lambda: mem, enc, dataset_dir, "adding", strict)
        count = len(mem)
    typer.echo(f"added {added} documents ({count} in all)", err=True)


@memory_app.command("remove")
def memory_remove(
    memory_dir: str = typer.Argument(..., help=MEMORY_HELP),
    ids: list[str] = typer.Argument(..., help="Document ids to remove; an unknown id removes nothing."),
    wait: float = typer.Option(MEMORY_WAIT_S, "--wait", min=0, help=WAIT_HELP),
) -> None:
    """Remove documents from a memory; they are never returned again."""
    from racm3.retrieval.backends import open_memory

    with _user_errors(key_hint="; nothing was removed"), open_memory(memory_dir, wait=wait) as mem:
        mem.remove(ids)
        left = len(mem)
    typer.echo(f"removed {len(set(ids))} documents ({left} left)", err=True)


@memory_app.command("info")
def memory_info(
    memory_dir: str = typer.Argument(..., help=MEMORY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print {count, encoder, dim, index} as JSON."),
) -> None:
    """What a memory holds and which encoder filled it."""
    import json

    from racm3.retrieval.backends import open_memory

    with _user_errors(), open_memory(memory_dir) as mem:
        info = mem.info()
    typer.echo(json.dumps(info) if as_json else "\n".join(f"{k}: {v}" for k, v in info.items()))


@memory_app.command("search")
def memory_search(
    memory_dir: str = typer.Argument(..., help=MEMORY_HELP),
    text: Optional[str] = typer.Option(None, "--text", help="Query text."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query image file."),
    k: int = typer.Option(2, "-k", help=f"How many documents (1-{MAX_SEARCH_K})."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="The encoder that built the memory; default: shipped."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {id, score, text, image}."),
    save_images: Optional[Path] = typer.Option(
        None, "--save-images", help="Folder for the hits' images, RANK-ID-HASH.png (the id cut to 60 safe characters). "
        "Default: one reused folder, hits/ in the racm3 cache ($RACM3_CACHE, else ~/.cache/racm3), holding "
        "ID-HASH.png per document returned (each search rewrites its hits' files; delete the folder at will)."),
) -> None:
    """Search a memory with a text or an image (plain top-k by cosine, no selection rules)."""
    import hashlib
    import json
    import os

    from racm3.documents import load_image
    from racm3.embedded import cache_dir
    from racm3.retrieval import load_encoder
    from racm3.retrieval.backends import is_milvus_uri, open_memory

    if (text is None) == (image is None):
        _fail("give exactly one of --text TEXT or --image PATH")
    if text is not None and not text.strip():
        _fail("--text is empty; give the words to search for, e.g. --text 'flag: France'")
    if not 1 <= k <= MAX_SEARCH_K:
        _fail(f"-k must be between 1 and {MAX_SEARCH_K}, got {k}")
    with _user_errors(), open_memory(memory_dir) as mem:
        enc = load_encoder(encoder)
        mem.require_encoder(enc.name)
        query = enc.embed_text([text]) if text is not None else enc.embed_image([load_image(image)])
        hits = mem.search(query, k)[0]
    out_dir = save_images if save_images is not None else cache_dir() / "hits"
    where = memory_dir if is_milvus_uri(memory_dir) else str(Path(memory_dir).resolve())  # names the memory
    rows = []
    for h in hits:
        path = None
        if h.document.image is not None:
            # a file name of bounded length whatever the id: its first 60 safe characters and a hash of it
            safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in h.id[:60])
            digest = hashlib.sha256(f"{where}\0{h.id}".encode()).hexdigest()[:16]
            path = out_dir / (f"{h.rank}-{safe}-{digest}.png" if save_images is not None else f"{safe}-{digest}.png")
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                h.document.image.save(tmp, format="PNG")
                os.replace(tmp, path)  # whole files only, also for a concurrent search
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                _fail(f"{out_dir}: cannot save the hits' images there ({exc.strerror or exc}); "
                      f"give another folder with --save-images DIR")
        rows.append({"id": h.id, "score": round(h.score, 6), "text": h.document.text,
                     "image": str(path) if path else None})
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False))
    else:
        for r in rows:
            typer.echo(f"{r['score']:.3f}  {r['id']}  {r['text']!r}  {r['image'] or ''}")

# --- train -------------------------------------------------------------------------------------

# Every trainer runs on the one runtime (racm3.runtime): the same device, precision and resume options.
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
PRECISION_HELP = "auto (bf16 autocast where supported, fp16 on CUDA without bf16, else fp32), bf16, fp16 or fp32."
RESUME_HELP = "Continue the run in OUT_DIR (a run folder with a checkpoint is refused without it)."


@train_app.command("encoder")
def train_encoder_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset (docs.jsonl folder, Parquet, shards, image folder); train split used."),
    out_dir: Path = typer.Argument(..., help="Where the image tower goes (config.json + model.safetensors)."),
    epochs: int = typer.Option(24, help="Passes over the train split."),
    batch_size: int = typer.Option(128, help="Images per step."),
    seed: int = typer.Option(0, help="Random seed (initialisation, order, augmentation)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's, all cores)."),
    split: str = typer.Option("train", help="train (a retriever), or all: an evaluation judge that knows every "
                                            "concept (racm3 eval knowledge --judge-encoder); never retrieve with it."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
) -> None:
    """Train the embedded encoder's image tower into the frozen all-MiniLM-L6-v2 text space (LiT)."""
    from racm3.retrieval.train_encoder import TrainEncoderConfig, train_encoder

    with _user_errors():
        cfg = TrainEncoderConfig(epochs=epochs, batch_size=batch_size, seed=seed, threads=threads, split=split,
                                 device=device, precision=precision)
        encoder = train_encoder(dataset_dir, out_dir, cfg, log=lambda m: typer.echo(m, err=True), resume=resume)
    typer.echo(f"saved {encoder.name} to {out_dir}")


@train_app.command("generator")
def train_generator_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset (docs.jsonl folder, Parquet, shards, image folder); train split used."),
    memory_dir: Path = typer.Argument(..., help="Memory to retrieve training contexts from (train split only; unused with --k 0)."),
    out_dir: Path = typer.Argument(..., help="Generator folder: config.json, model.safetensors, checkpoint.safetensors, train_log.jsonl."),
    tokenizers: Optional[Path] = typer.Option(None, help="Model folder with text_tokenizer/ and image_tokenizer/; default: shipped."),
    encoder: Optional[Path] = typer.Option(None, help="Encoder that filled the memory; default: shipped."),
    preset: str = typer.Option("emoji-small", help="Generator preset: tiny, emoji-small, medium (~27M, for GPUs), or a PRESET.json of GeneratorConfig fields."),
    k: int = typer.Option(2, "--k", help="At most k documents in context (0 = the no-retrieval CM3 baseline)."),
    alpha: float = typer.Option(0.1, help="Loss weight of retrieved documents' tokens."),
    text_weight: Optional[float] = typer.Option(None, help="Loss weight of the main document's caption tokens (its "
                                                "image codes: 1); default: the recipe's."),
    recipe: str = typer.Option("v2", help="Lesson shares to start from: v2, or v1 (the shipped emoji-small's, "
                               "which scripts/train_emoji_small.sh reproduces); the options below change single shares."),
    copy_rate: Optional[float] = typer.Option(None, help="Share of sequences whose context holds the document itself "
                                              "(0 = the paper's rule); default: the recipe's."),
    sibling_rate: Optional[float] = typer.Option(None, help="Share holding a same-concept, same-style sibling."),
    cross_style_rate: Optional[float] = typer.Option(None, help="Share holding the other art style's drawing of the concept."),
    relabel_rate: Optional[float] = typer.Option(None, help="Share of caption lessons: image first, caption swapped for "
                                                 "another concept's in the document and its copy in context (copy, not recall)."),
    distractor_rate: Optional[float] = typer.Option(None, help="Share of distractor lessons: the document among other "
                                                    "concepts' documents, the prompt decides which to copy."),
    style_rate: Optional[float] = typer.Option(None, help="Share of style lessons: demonstrations of other concepts in the "
                                               "document's style, then the document (caption -> image)."),
    extra_distractor_rate: Optional[float] = typer.Option(None, help="v1's distractors: chance to add another concept's "
                                                          "drawing to any context with room."),
    mask_rate: Optional[float] = typer.Option(None, help="Share of sequences CM3-masked (the rest plain causal)."),
    steps: int = typer.Option(1500, help="Optimizer steps."),
    batch_size: int = typer.Option(24, help="Sequences per step (per process under torchrun)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warmup then cosine)."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    init_from: Optional[Path] = typer.Option(None, help="A generator folder of this preset and these tokenizers whose "
                                             "weights start a new run (fine-tuning; a fresh optimizer and schedule)."),
    snapshot_every: int = typer.Option(0, help="Keep a generator folder OUT_DIR/step-N every N steps (0 = off)."),
    eval_every: int = typer.Option(10, help="Measure the context benefits on held-out lessons every N steps "
                                   "(~54 forward passes each; a multiple of the 10-step log interval)."),
    loader_workers: Optional[int] = typer.Option(None, help="Processes building training batches (default: 2 on "
                                                 "CUDA, 0 = in the training process on a CPU)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
) -> None:
    """Train the RA-CM3 generator on retrieval-augmented CM3 sequences (also under torchrun --nproc-per-node N)."""
    from dataclasses import replace

    from racm3.generator.data import get_recipe
    from racm3.generator.train import TrainConfig, train

    given = {"copy_rate": copy_rate, "sibling_rate": sibling_rate, "cross_style_rate": cross_style_rate,
             "relabel_rate": relabel_rate, "distractor_rate": distractor_rate, "style_rate": style_rate,
             "extra_distractor_rate": extra_distractor_rate, "mask_rate": mask_rate, "text_weight": text_weight}
    with _user_errors():
        shares = replace(get_recipe(recipe), k=k, alpha=alpha, **{n: v for n, v in given.items() if v is not None})
        cfg = TrainConfig(dataset=dataset_dir, memory=memory_dir if k else None, out=out_dir, tokenizers=tokenizers, encoder=encoder,
                          preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                          resume=resume, init_from=init_from, snapshot_every=snapshot_every, eval_every=eval_every,
                          recipe=shares,
                          device=device,
                          precision=precision, loader_workers=loader_workers)
        last = train(cfg)
    if last:  # rank 0 under torchrun; the other ranks return no metrics and say nothing
        typer.echo(f"saved the generator to {out_dir}: " + ", ".join(f"{k_} {v:.3f}" for k_, v in last.items()
                                                                  if isinstance(v, float)))


@train_app.command("assemble")
def train_assemble_cmd(
    out_dir: Path = typer.Argument(..., help="Model folder to write into (e.g. src/racm3/pretrained/emoji-small)."),
    text_tokenizer: Optional[Path] = typer.Option(None, help="Folder with tokenizer.json."),
    image_tokenizer: Optional[Path] = typer.Option(None, help="Trained VQ folder (stored as float16)."),
    encoder: Optional[Path] = typer.Option(None, help="Trained encoder folder."),
    generator: Optional[Path] = typer.Option(None, help="Trained RA-CM3 generator folder."),
    baseline: Optional[Path] = typer.Option(None, help="Trained no-retrieval (--k 0) generator folder."),
    image_temperature: Optional[float] = typer.Option(None, help="The folder's default sampling temperature for "
                                                      "images (sampling.json; 1.0 without one)."),
    text_temperature: Optional[float] = typer.Option(None, help="The same for text (0.7 without one)."),
) -> None:
    """Put trained components into one model folder (weights and configs only); others already there stay."""
    from racm3.pretrained import assemble

    sampling = {}
    for option, key, value in (("--image-temperature", "image_temperature", image_temperature),
                               ("--text-temperature", "text_temperature", text_temperature)):
        if value is not None:
            if not temperature_ok(value):
                _fail(f"{option} must be {TEMPERATURE_RULE}, got {value}; nothing was written")
            sampling[key] = value
    with _user_errors():
        path = assemble(out_dir, sampling=sampling, text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer,
                        encoder=encoder, generator=generator, generator_k0=baseline)
    typer.echo(f"assembled {path}")


@train_app.command("image-tokenizer")
def train_image_tokenizer_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (docs.jsonl + images/); only split == 'train' is used."),
    out_dir: Path = typer.Argument(..., help="Where the tokenizer goes (config.json + model.safetensors + checkpoint.safetensors)."),
    preset: str = typer.Option("emoji-8x8", help="Preset (architecture and training settings): a file name "
                               "in racm3/tokenizers/image_presets/ without .json, or a PRESET.json of your own."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps in total (a resumed run continues up to this); "
                                        "default: the preset's."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step; default: the preset's (32)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (warm-up, then cosine decay); default: the preset's."),
    perceptual_weight: Optional[float] = typer.Option(None, help="Weight of the Inception perceptual term (0: off); "
                                                      "default: the preset's."),
    init_from: Optional[Path] = typer.Option(None, help="A trained tokenizer of this preset to start from (a new "
                                             "run); the preset's decoder_only fine-tunes its decoder alone, keeping "
                                             "every image's codes."),
    seed: Optional[int] = typer.Option(None, help="Random seed (initialisation and batches)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's, all cores)."),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " The encoder and decoder only: the quantizer "
                                            "stays float32; default: the preset's (the shipped VQ's is fp32)."),
) -> None:
    """Train the image tokenizer (pixel L2 + L1 + commitment, and the preset's perceptual term)."""
    from racm3.tokenizers.image_train import preset_train_config, train_image_tokenizer

    with _user_errors():
        cfg = preset_train_config(preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads,
                                  device=device, precision=precision, perceptual_weight=perceptual_weight)
        summary = train_image_tokenizer(dataset_dir, out_dir, preset, cfg, resume=resume, init_from=init_from)
    typer.echo(f"saved image tokenizer ({summary['preset']}, {summary['steps']} steps, "
               f"{summary['elapsed_s']:.0f} s of training) to {out_dir}")


@train_app.command("text-tokenizer")
def train_text_tokenizer_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset (docs.jsonl folder, Parquet, shards, image folder); train split captions are used."),
    out_dir: Path = typer.Argument(..., help="Where tokenizer.json goes."),
    vocab_size: int = typer.Option(2048, help="BPE vocabulary size (256 bytes + merges)."),
) -> None:
    """Train the byte-level BPE text tokenizer on the train split's captions."""
    from racm3.tokenizers.text import train_text_tokenizer

    with _user_errors():
        tok, captions = train_text_tokenizer(dataset_dir, out_dir, vocab_size)
    typer.echo(f"trained on {captions} captions: {tok.vocab_size} tokens, saved {Path(out_dir) / 'tokenizer.json'}")


@train_app.command("all")
def train_all_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset (docs.jsonl folder, Parquet, WebDataset shards, image folder)."),
    out_dir: Path = typer.Argument(..., help="Run folder: one folder per stage, model/ (the model folder), "
                                             "memory/, summary.json."),
    image_size: Optional[int] = typer.Option(None, help="64, 128 or 256: trains the image tokenizer preset v2-SIZE "
                                                        "(default 64), unless --image-tokenizer-preset names one."),
    image_tokenizer_preset: Optional[str] = typer.Option(None, help="Image tokenizer preset (a name in "
                                                         "racm3/tokenizers/image_presets/ or a PRESET.json); "
                                                         "replaces the pipeline's image tokenizer stage whole."),
    generator_preset: Optional[str] = typer.Option(None, help="Generator preset of both generators (default: the "
                                                   "pipeline's; v2's v2-small-aligned and v2-small hold k=2 of "
                                                   "256-code images in 1,024 tokens), medium, emoji-small (384 tokens: 64-code images), tiny, or a "
                                                   "PRESET.json; not with --from (MODEL's are used)."),
    encoder: Optional[str] = typer.Option(None, help="Use this encoder folder (or clip:PATH, a CLIP folder written "
                                          "by save_pretrained()) instead of training the image tower."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    steps_scale: float = typer.Option(1.0, help="x every trainer's default length (image tokenizer steps, encoder "
                                                "epochs, generator steps); e.g. 0.1 for a quick trial."),
    start: Optional[Path] = typer.Option(None, "--from", metavar="MODEL", help="Start from MODEL (a model folder: the shipped "
                                         "src/racm3/pretrained/emoji-small, or a train all run's model/): its "
                                         "tokenizers and generators as they are, the encoder and memory made "
                                         "for this data set; --generator-steps N fine-tunes the generators."),
    generator_steps: Optional[int] = typer.Option(None, help="Steps of each generator (default: the pipeline's x "
                                                  "--steps-scale; with --from, 0: its generators as they are)."),
    pipeline: Optional[str] = typer.Option(None, help="Every stage's settings: v2 (the default), emoji-small or "
                                           "emoji-v2 (the shipped models' own), or a PIPELINE.json "
                                           "(racm3/pipelines/); the options above change them."),
) -> None:
    """Every stage from a data set to a model folder: data split, tokenizers, encoder, memory, RA-CM3 generator and
    its k=0 baseline (side by side on a CPU, half the cores each). A stage already done is skipped, one cut short
    resumes; a summary table ends the run."""
    from racm3.train_all import TrainAllOptions, format_summary, train_all

    with _user_errors():
        summary = train_all(TrainAllOptions(dataset_dir, out_dir, image_size, image_tokenizer_preset,
                                            generator_preset, encoder, device, steps_scale, start,
                                            generator_steps, pipeline),
                            log=lambda m: typer.echo(m, err=True))
    typer.echo(format_summary(summary))

# --- generate ----------------------------------------------------------------------------------


def _load_model_and_memory(model_dir: Optional[Path], memory_dir: Optional[Path], k: int, generator: str = "generator",
                           check=None, device: str = "auto"):
    """The model (shipped by default) and the memory (the emoji memory, built on first use, by default).

    check(model), when given, runs between the two: options that depend on the model are refused before
    the memory is opened or built.
    """
    from racm3.embedded import ensure_emoji_memory
    from racm3.pipeline import RACM3
    from racm3.retrieval.memory import Memory

    with _user_errors():
        model = RACM3.from_pretrained(model_dir, generator=generator, device=device)
    if check is not None:
        check(model)
    if k == 0:
        return model, None
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    path = memory_dir if memory_dir is not None else ensure_emoji_memory(model.encoder, log=log)
    try:
        return model, Memory.open(path)
    except Exception as exc:  # a missing or foreign memory folder: say which and how to make one
        _fail(f"{path}: {exc}")


def _slug(text: str) -> str:
    """A file name for a caption: 'flag: France' -> 'flag-france'.

    A caption the ASCII slug cannot tell apart from others (non-Latin letters, cut at 60 characters) gets a
    short hash of the caption: '日本' -> 'caption-1a2b3c4d', 'café' -> 'caf-5e6f7a8b'.
    """
    import hashlib
    import re

    lowered = text.lower()
    slug = re.sub(r"[^0-9a-z]+", "-", lowered).strip("-")
    lossy = len(slug) > 60 or any(c.isalnum() and not ("0" <= c <= "9" or "a" <= c <= "z") for c in lowered)
    if not lossy and slug:
        return slug
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug[:60].rstrip('-') or 'caption'}-{digest}"




def check_generate_options(*, samples: int, temperature: float | None, k: int, seed: int, guidance: float | None = None,
                           top_p: float | None = None, caption: str | None = None) -> None:
    """Refuse option values the generate commands cannot use, one line naming the option (exit 1).

    Runs before the model is loaded, so the fuzz tests exercise it without one.
    """
    import math

    if not 1 <= samples <= MAX_SAMPLES:
        _fail(f"--samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    if k < 0:
        _fail(f"-k must be 0 (no retrieval) or more documents, got {k}")
    if not 0 <= seed <= MAX_SEED:
        _fail(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if temperature is not None and not temperature_ok(temperature):
        _fail(f"--temperature must be {TEMPERATURE_RULE}, "
              f"got {temperature}")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        _fail(f"--guidance must be between 0 and {MAX_GUIDANCE:g} (1 = off, 3 is the default), got {guidance}")
    if top_p is not None and not 0 < top_p <= 1:
        _fail(f"--top-p must be above 0 and at most 1 (1 = off), got {top_p}")
    if caption is not None:
        if not caption.strip():
            _fail("the caption is empty; give the text to draw, e.g. 'flag: France'")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            _fail("the caption is not valid UTF-8 text")


def check_context(model, k: int, caption: str | None = None) -> None:
    """Refuse a -k or a caption the generator's context cannot hold (RACM3.check_request), before any retrieval."""
    try:
        model.check_request(k, caption)
    except ValueError as exc:
        _fail(str(exc))


def output_path(caption: str, out: Optional[Path]) -> tuple[Path, bool]:
    """Where generate image writes, and whether it may replace a file there (only a file --out names).

    Refused before generating: an --out that is a folder, without an image extension, or whose folder
    cannot be created or written. The default, racm3-output/SLUG.png, never replaces a file: SLUG-2.png...
    """
    import tempfile

    from PIL import Image

    path = out if out is not None else Path("racm3-output") / f"{_slug(caption)}.png"
    if path.is_dir():
        _fail(f"--out {path} is a folder; give a file name such as {path / 'image.png'}")
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        _fail(f"--out {path}: needs an image file extension Pillow can write, such as .png")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        _fail(f"--out {path}: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        _fail(f"--out {path}: cannot write into {folder} ({exc.strerror or exc}); choose another folder")
    return (path, True) if out is not None else (_free_path(path), False)


def _free_path(path: Path) -> Path:
    """path, or path with -2, -3, ... before its suffix: the first name no file has."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def save_output_image(image, path: Path, replace: bool) -> Path:
    """Write image to path atomically (a temporary file moved in); without replace, never over a file
    (a name taken since output_path chose it moves on to the next free one). Returns the path written."""
    import os
    import tempfile

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".racm3-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=Image.registered_extensions()[path.suffix.lower()])
        if replace:
            os.replace(tmp_name, path)
            return path
        while True:
            try:
                os.link(tmp_name, path)  # fails if the name exists: no file is ever replaced
                return path
            except FileExistsError:
                path = _free_path(path)
            except OSError:  # a file system without hard links: check, then move in
                path = _free_path(path)
                os.replace(tmp_name, path)
                return path
    finally:
        Path(tmp_name).unlink(missing_ok=True)


TEMPERATURE_HELP = ("Sampling temperature (0 = greedy); default: the model folder's (its sampling.json; else 1.0 for "
                    "an image, 0.7 for text).")


@generate_app.command("image")
def generate_image_cmd(
    caption: str = typer.Argument(..., help="What to draw, e.g. 'flag: France'."),
    memory: Optional[Path] = typer.Option(None, help="Memory folder; default: the emoji memory (built on first use)."),
    model: Optional[Path] = typer.Option(None, help="Model folder; default: the shipped emoji-small."),
    k: int = typer.Option(2, "-k", "--k", help="Documents retrieved into the context (0 = no retrieval)."),
    samples: int = typer.Option(8, help=f"Images sampled (1-{MAX_SAMPLES}); the best by the encoder's score is kept."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance scale (1 = off)."),
    temperature: Optional[float] = typer.Option(None, help=TEMPERATURE_HELP),
    top_p: float = typer.Option(0.9, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Optional[Path] = typer.Option(None, help="Image to write (replaced if present); default "
                                       "racm3-output/CAPTION.png, never replacing a file (CAPTION-2.png...)."),
    as_json: bool = typer.Option(False, "--json", help="Print {image, sources, seconds} as JSON."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Caption -> retrieve -> image: draw a caption, grounded in the documents retrieved for it."""
    import json

    check_generate_options(samples=samples, temperature=temperature, k=k, seed=seed, guidance=guidance, top_p=top_p,
                           caption=caption)
    path, replace = output_path(caption, out)
    m, mem = _load_model_and_memory(model, memory, k, check=lambda m_: check_context(m_, k, caption), device=device)
    with _user_errors():  # a memory filled by another encoder
        result = m.generate_image(caption, memory=mem, k=k, num_samples=samples, guidance=guidance,
                                  temperature=temperature, top_p=top_p, seed=seed)
    try:
        path = save_output_image(result.image, path, replace)
    except OSError as exc:  # the folder changed since output_path checked it
        _fail(f"--out {path}: cannot write the image ({exc.strerror or exc}); nothing was written")
    payload = {"image": str(path), **{k_: v for k_, v in result.to_json().items() if k_ in ("sources", "seconds")}}
    if as_json:
        typer.echo(json.dumps(payload, ensure_ascii=False))
    else:
        typer.echo(f"wrote {path} in {result.seconds:.1f} s")
        for h in result.sources:
            typer.echo(f"  source {h.score:.3f}  {h.id}  {h.document.text!r}")


@generate_app.command("text")
def generate_text_cmd(
    image_path: Path = typer.Argument(..., help="Image to caption (any size; converted to RGB)."),
    memory: Optional[Path] = typer.Option(None, help="Memory folder; default: the emoji memory (built on first use)."),
    model: Optional[Path] = typer.Option(None, help="Model folder; default: the shipped emoji-small."),
    k: int = typer.Option(2, "-k", "--k", help="Documents retrieved into the context (0 = no retrieval)."),
    samples: int = typer.Option(4, help=f"Captions sampled (1-{MAX_SAMPLES}); the best by the encoder's score is "
                                        "kept."),
    temperature: Optional[float] = typer.Option(None, help=TEMPERATURE_HELP),
    seed: int = typer.Option(0, help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print {text, sources, seconds} as JSON."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Image -> retrieve -> caption: name what an image shows, grounded in the documents retrieved for it."""
    import json

    from racm3.documents import load_image

    check_generate_options(samples=samples, temperature=temperature, k=k, seed=seed)
    with _user_errors():  # a bad image is a BadRecord, one line naming the file
        image = load_image(image_path)
    m, mem = _load_model_and_memory(model, memory, k, check=lambda m_: check_context(m_, k), device=device)
    with _user_errors():
        result = m.generate_text(image, memory=mem, k=k, num_samples=samples, temperature=temperature, seed=seed)
    payload = {"text": result.text, **{k_: v for k_, v in result.to_json().items() if k_ in ("sources", "seconds")}}
    if as_json:
        typer.echo(json.dumps(payload, ensure_ascii=False))
    else:
        typer.echo(result.text)
        for h in result.sources:
            typer.echo(f"  source {h.score:.3f}  {h.id}  {h.document.text!r}")


# --- eval --------------------------------------------------------------------------------------


@eval_app.command("retrieval")
def eval_retrieval(
    memory_dir: Path = typer.Argument(..., help="A memory folder built with the encoder under test."),
    dataset_dir: Path = typer.Argument(..., help="Dataset whose documents are the queries."),
    split: Optional[str] = typer.Option("heldout", "--split", help="Queries from this split only ('all' for every one)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="The encoder that built the memory; default: shipped."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Recall@1/5/10 text->image and image->text: through the memory, and cross-modal within the split."""
    import json

    from racm3.retrieval.evaluate import evaluate_retrieval

    with _user_errors():
        result = evaluate_retrieval(memory_dir, dataset_dir, split, encoder)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


@eval_app.command("image-tokenizer")
def eval_image_tokenizer_cmd(
    tokenizer_dir: Path = typer.Argument(..., help="An image tokenizer folder (config.json + model.safetensors)."),
    dataset_dir: Path = typer.Argument(..., help="Dataset folder (docs.jsonl + images/)."),
    split: str = typer.Option("heldout", "--split", help="Images of this split ('all' for every one)."),
    rfid: bool = typer.Option(True, "--rfid/--no-rfid", help="Compute rFID (Inception on CPU: minutes)."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
    rfid_images: Optional[int] = typer.Option(None, help="rFID on the first N images only (default: all)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """PSNR, codebook usage, tokens per image and rFID of the image tokenizer's reconstructions."""
    import json

    import torch

    from racm3.tokenizers.image import ImageTokenizer
    from racm3.tokenizers.image_train import evaluate_image_tokenizer, load_split_images

    torch.set_num_threads(threads)
    with _user_errors():
        tok = ImageTokenizer.from_pretrained(tokenizer_dir)
        images = load_split_images(dataset_dir, None if split == "all" else split, tok.image_size, limit)
    result = evaluate_image_tokenizer(tok, images, rfid=rfid, rfid_images=rfid_images)
    result["split"] = split
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            typer.echo(f"{key}: {value}")


@eval_app.command("knowledge")
def eval_knowledge_cmd(
    model: Optional[Path] = typer.Option(None, help="Model folder; default: the shipped emoji-small."),
    baseline: Optional[Path] = typer.Option(None, help="No-retrieval baseline (model folder or generator folder); "
                                            "default: generator_k0/ beside the model's generator."),
    memory: Optional[Path] = typer.Option(None, help="Memory folder (only read); default: the emoji memory."),
    dataset: Optional[Path] = typer.Option(None, help="Dataset folder (held-out split = queries); default: emoji."),
    judge_encoder: Optional[Path] = typer.Option(None, help="Encoder the judges use; default: the model's. E.g. "
                                                 "one that knows every concept: racm3 train encoder --split all."),
    limit: int = typer.Option(100, help="Held-out query documents (one per concept first)."),
    samples: int = typer.Option(4, help="Samples per output, reranked by the encoder."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance for caption->image."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature of caption->image's codes; "
                                                "default: the model's (sampling.json, else 1.0)."),
    caption_rerank: str = typer.Option("image", help="How image->caption keeps one sample: image (the paper's "
                                       "caption-image score) or source (similarity to the best-matching source's caption)."),
    rows: Optional[str] = typer.Option(None, help="Comma-separated rows to run; default: all seven."),
    directions: Optional[str] = typer.Option(None, help="caption_to_image, image_to_caption or both (comma-"
                                             "separated); default: both."),
    fid: bool = typer.Option(True, "--fid/--no-fid", help="Inception FID of each row's images."),
    seed: int = typer.Option(0, help="Random seed (query choice and sampling)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"rows": {...}} as JSON.'),
) -> None:
    """On held-out concepts: no retrieval vs retrieval only vs RA-CM3 (k=1, 2, cross-style, leave-one-out)."""
    import json

    import torch

    from racm3.evaluation.knowledge import DIRECTIONS, ROWS, KnowledgeConfig, format_table, knowledge

    if threads is not None:
        torch.set_num_threads(threads)
    log = lambda m: typer.echo(m, err=True)  # noqa: E731  progress on stderr keeps --json clean
    chosen = tuple(d.strip() for d in directions.split(",")) if directions else DIRECTIONS
    if set(chosen) - set(DIRECTIONS) or not chosen:
        _fail(f"--directions {directions!r}: choose from {', '.join(DIRECTIONS)} (comma-separated)")
    with _user_errors():
        cfg = KnowledgeConfig(limit=limit, samples=samples, guidance=guidance, temperature=temperature, seed=seed, fid=fid,
                              caption_rerank=caption_rerank,
                              rows=tuple(r.strip() for r in rows.split(",")) if rows else ROWS,
                              directions=chosen)
        result = knowledge(model, baseline, memory, dataset, cfg, log=log, judge_encoder_dir=judge_encoder)
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        typer.echo(format_table(result))
        typer.echo(f"{result['queries']} held-out queries, {result['elapsed_s']} s")

# --- demo --------------------------------------------------------------------------------------


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("racm3-demo"), help="Folder for index.html and its images."),
    model: Optional[Path] = typer.Option(None, help="Model folder; default: the shipped emoji-small."),
    k: int = typer.Option(2, "-k", "--k", help="Documents retrieved into each context."),
    samples: int = typer.Option(8, help="Images sampled per caption (best kept by the encoder's score)."),
    dataset: Optional[Path] = typer.Option(None, help="Data set the prompts come from (half train, half held-out "
                                           "documents); default: the emoji set. E.g. a train all run's data/."),
    memory: Optional[Path] = typer.Option(None, help="Memory folder (only read); default: the emoji memory. "
                                          "E.g. a train all run's memory/."),
) -> None:
    """Generate both ways and write OUT/index.html with the sources; by default on the emoji data and memory
    (built if absent), or on a data set and memory of your own (those of `racm3 train all`)."""
    from racm3.demo import run_demo

    if (dataset is None) != (memory is None):  # prompts of one data set against another's memory show nothing
        _fail(f"give --dataset and --memory together (a data set and the memory built from it, e.g. a train all "
              f"run's data/ and memory/), or neither for the emoji set; got only --{'dataset' if dataset else 'memory'}")
    with _user_errors():
        index = run_demo(out, model_dir=model, k=k, samples=samples, log=lambda m: typer.echo(m, err=True),
                         dataset_dir=dataset, memory_dir=memory)
    typer.echo(str(index.resolve()))

# --- serve -------------------------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    model: Optional[Path] = typer.Option(None, help="Model folder; default: the shipped emoji-small."),
    memory: Optional[Path] = typer.Option(None, help="Memory folder; default: the emoji memory (built on first use)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default answers this machine only."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port, printed at start)."),
    token: Optional[str] = typer.Option(None, envvar="RACM3_SERVE_TOKEN",
                                        help="Writes (POST/DELETE /v1/memory/documents) need `Authorization: Bearer "
                                             "TOKEN`; without a token the memory is read-only."),
    workers: int = typer.Option(1, help="Generations run at once (1-8); each uses every core."),
    queue: int = typer.Option(4, help="Generations waiting beyond those (0-256); more are refused with 503."),
    timeout: float = typer.Option(120.0, help="Seconds a request may take before 504 (1-3600)."),
    max_upload_mb: float = typer.Option(8.0, help="Largest request body in MiB (0.01-1024); larger -> 413."),
    cors_origin: Optional[list[str]] = typer.Option(None, help="Allow browser pages from this origin (repeatable); "
                                                              "none by default."),
    index_name: Optional[str] = typer.Option(None, help="Index name for /indices-list and /knn-service; default: "
                                                        "the memory folder's name."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Serve the model and its memory over HTTP: the JSON API under /v1, clip-retrieval's /knn-service, a web page at /."""
    if not 0 <= port <= 65535:
        _fail(f"--port must be between 0 and 65535, got {port}")
    if not 1 <= workers <= 8:
        _fail(f"--workers must be between 1 and 8, got {workers}")
    if not 0 <= queue <= 256:
        _fail(f"--queue must be between 0 and 256, got {queue}")
    if not 1 <= timeout <= 3600:
        _fail(f"--timeout must be between 1 and 3600 seconds, got {timeout}")
    if not 0.01 <= max_upload_mb <= 1024:
        _fail(f"--max-upload-mb must be between 0.01 and 1024, got {max_upload_mb}")
    if token is not None and not token.strip():
        _fail("--token is empty; give a secret, or leave --token out for a read-only memory")
    import socket

    import uvicorn

    from racm3.serving.app import load_app
    from racm3.serving.limits import Limits

    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), generation_workers=workers,
                    generation_queue=queue, timeout_s=timeout)
    try:
        sock = socket.create_server((host, port))  # bind before loading: a taken port fails at once
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host")
    try:
        with _user_errors():  # a broken model folder, a device this machine lacks, a foreign memory
            web = load_app(model, memory, device=device, log=lambda m: typer.echo(m, err=True), token=token,
                           limits=limits, cors_origins=tuple(cors_origin or ()), index_name=index_name)
    except typer.Exit:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"racm3 serve: http://{shown}:{bound}/  (API docs /docs, writes {'need the token' if token else 'off'})",
               err=True)
    uvicorn.Server(uvicorn.Config(web, log_level="warning")).run(sockets=[sock])
