"""`racm3 train all`: a data set in, a trained RA-CM3 model folder out, every stage in order.

Every stage in order, each a call of the library's own functions, with the settings of a pipeline
(racm3/pipelines: v2 by default; emoji-small and emoji-v2 are the shipped models' own, which
scripts/train_emoji_small.sh and train_emoji_v2.sh run). Each stage writes its output under OUT and then
OUT/stages/NAME.json: its row of the summary (seconds, size on disk, held-out quality) and the settings it ran
with. A stage whose row and output both exist is skipped; a training stage cut short resumes from its
checkpoint (the trainers' one resume rule); a row written with other settings is refused rather than silently
reused. On a CPU the two generators train side by side, a process each.

`--from MODEL` starts from a trained model instead of nothing: MODEL's two tokenizers are used as they are (their
stages only measure them on the held-out documents), and so are its two generators, unless --generator-steps N
fine-tunes them (FINE_TUNE's learning rate and warm-up). A set of a few hundred documents is too small to learn
to copy from: trained from nothing on one, a generator memorises the training drawings and reads little context,
and fine-tuned on one it loses some of the copying it learned; a generator that learned to copy on a larger set,
given the new documents as its memory, draws from them as they are (the README's icon walk-through measures all
three). That is RA-CM3's claim: new knowledge enters through the memory, without retraining.

The first stage copies the data set into OUT/data (docs.jsonl + images/), giving each document without a split
the split of its concept (racm3.splits.with_split), so every later stage trains on the same train split and is
measured on the same held-out documents, whatever format the data came in.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from racm3.generator.train import TrainConfig

STAGES_DIR = "stages"  # OUT/stages/NAME.json: a stage's summary row, written once its output is complete
SUMMARY_FILE = "summary.json"
IMAGE_SIZES = (64, 128, 256)
DEFAULT_IMAGE_SIZE = 64
# The context check's caption length: a preset must hold the main document and one retrieved one with captions
# of this many tokens, or RA-CM3 would never see a retrieved document.
CAPTION_TOKENS = 16
# --from MODEL --generator-steps N: fine-tuning's peak learning rate (the trainer's from nothing: 1e-3) and warm-up
# (at most a third of the steps): the schedule of the README's icon fine-tunes at 3e-4 (a larger data set's
# choice: on the 665 icons any fine-tuning measured lowered the held-out judge, which is why N defaults to 0)
FINE_TUNE = {"lr": 3e-4, "warmup": 100}


@dataclass(frozen=True)
class TrainAllOptions:
    """What `racm3 train all` takes (its options, one to one)."""

    dataset: Path
    out: Path
    image_size: int | None = None  # picks the image tokenizer preset v2-SIZE; None: the named preset's, or 64
    image_tokenizer_preset: str | None = None  # None: the pipeline's
    generator_preset: str | None = None  # None: the pipeline's; refused with --from (MODEL's are used)
    encoder: str | None = None  # an encoder or CLIP folder ("clip:PATH" insists on a CLIP) instead of training one
    device: str = "auto"
    steps_scale: float = 1.0  # x each trainer's default length: image tokenizer steps, encoder epochs, generator steps
    start: Path | None = None  # --from MODEL: its tokenizers and (with generator_steps None or 0) generators as they are
    generator_steps: int | None = None  # None: the pipeline's x steps_scale from nothing, 0 (kept) with --from
    pipeline: str | None = None  # a name in racm3/pipelines or a PIPELINE.json; None: DEFAULT_PIPELINE
    side_by_side: bool | None = None  # both generators at once, half the cores each; None: on a CPU with >= 2 cores


@dataclass(frozen=True)
class Stage:
    name: str
    output: Path  # what the stage makes: with OUT/stages/NAME.json beside, the stage is done
    settings: dict  # what it runs with; a done stage made with other settings is refused, not reused
    run: Callable[[], dict | None]  # does the work; returns its held-out quality numbers (None: none measured)
    training: TrainConfig | None = None  # a generator stage's training, for running two side by side


def image_tokenizer_preset(image_size: int | None, preset: str | None) -> str:
    """The preset to train: the one named (refused if it is not of --image-size), else v2-SIZE."""
    from racm3.tokenizers.image import ImageTokenizerConfig, image_tokenizer_presets, read_preset

    if image_size is not None and image_size not in IMAGE_SIZES:
        raise ValueError(f"--image-size must be one of {', '.join(map(str, IMAGE_SIZES))}, got {image_size}")
    if preset is None:
        preset = f"v2-{image_size or DEFAULT_IMAGE_SIZE}"
        try:
            read_preset(preset)
        except ValueError:
            raise ValueError(f"--image-size {image_size or DEFAULT_IMAGE_SIZE} trains the image tokenizer preset "
                             f"{preset!r}, which is not installed (racm3/tokenizers/image_presets/{preset}.json); "
                             f"name one with --image-tokenizer-preset: {', '.join(image_tokenizer_presets())} or a "
                             "PRESET.json") from None
    size = ImageTokenizerConfig.from_preset(preset).image_size
    if image_size is not None and size != image_size:
        raise ValueError(f"image tokenizer preset {preset} (--image-tokenizer-preset, or the pipeline's) takes {size} "
                         f"px images, not --image-size {image_size}; drop --image-size, or give "
                         f"--image-tokenizer-preset of that size (v2-{image_size})")
    return preset


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _image_schedule(preset: str, scale: float) -> dict[str, int]:
    """An image tokenizer preset's steps and warm-up, x scale: the whole schedule scales, so a 5% warm-up stays 5%."""
    from racm3.tokenizers.image_train import preset_train_config

    cfg = preset_train_config(preset)
    return {"steps": _scaled(cfg.steps, scale), "warmup": round(cfg.warmup * scale)}


def _given_encoder(spec: str, option: str = "--encoder") -> Path:
    """The folder of --encoder PATH or clip:PATH (or a pipeline's given encoder: option says which), checked to
    load (a CLIP for clip:) before any work starts."""
    from racm3.retrieval.encoder import ClipEncoder, load_encoder

    clip = spec.startswith("clip:")
    path = Path(spec[len("clip:"):] if clip else spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option} {spec}: no config.json in {path}; give an encoder folder (written by "
                                "`racm3 train encoder`, or a model folder's encoder/) or a CLIP folder")
    encoder = load_encoder(path)  # a broken folder fails here, not after the tokenizers have trained
    if clip and not isinstance(encoder, ClipEncoder):
        raise ValueError(f"{option} {spec}: {path} is not a CLIP folder; drop the clip: prefix to use it as it is")
    return path


def _check_context(generator_preset: str, n: int, image_preset: str) -> None:
    """Refuse a generator preset whose context cannot hold the main document and one retrieved document, at n
    codes per image (those of the image tokenizer image_preset names)."""
    from racm3.generator.model import get_preset, list_presets

    max_len = get_preset(generator_preset).max_len
    need = _context_need(n)
    if max_len < need:
        fit = [p for p in list_presets() if get_preset(p).max_len >= need]
        raise ValueError(f"generator preset {generator_preset} (--generator-preset, or the pipeline's): its "
                         f"{max_len}-token context cannot hold a retrieved document beside the main one at {n} "
                         f"codes per image ({image_preset}: {need} tokens); "
                         f"choose a generator preset with a longer context: {', '.join(fit) + ' or ' if fit else ''}"
                         f"a PRESET.json with max_len >= {need}")


def _context_need(n: int) -> int:
    """Tokens for the main document and one retrieved one at n codes per image and CAPTION_TOKENS per caption."""
    # <bos> [<doc> caption <img> codes </img> </doc>] caption <img> codes </img> <eos>
    return 2 * (n + CAPTION_TOKENS) + 8


def _start_model(opts: TrainAllOptions, fine_tune: bool) -> tuple[Path, dict[str, str | None]]:
    """--from MODEL, checked before any work: (MODEL, the installed preset of each of its generators, by folder
    name, when they are to be fine-tuned: None when they are kept as they are, whatever they were made with).
    --image-size must agree with MODEL; --image-tokenizer-preset and --generator-preset are refused (MODEL's
    image tokenizer and generators are the ones used)."""
    from racm3.generator.model import RACM3_FILE
    from racm3.tokenizers.image import ImageTokenizer

    start = opts.start
    for option, given, what in (("--image-tokenizer-preset", opts.image_tokenizer_preset, "image tokenizer as it is"),
                                ("--generator-preset", opts.generator_preset, "generators as they are")):
        if given is not None:
            raise ValueError(f"--from {start} uses that model's {what}; drop {option}")
    for part in ("text_tokenizer", "image_tokenizer", "generator", "generator_k0"):
        if not (start / part / "config.json").is_file() and not (start / part / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--from {start}: no {part}/ in it; give a model folder with both tokenizers and "
                                    "both generators (a shipped model, or the model/ of a finished `racm3 train all`)")
    image = ImageTokenizer.from_pretrained(start / "image_tokenizer")
    if opts.image_size is not None and opts.image_size != image.image_size:
        raise ValueError(f"--from {start} draws {image.image_size} px images, not --image-size {opts.image_size}; "
                         "drop --image-size, or train from nothing at that size")
    described = _generator_description(start / "generator" / RACM3_FILE)
    need = _context_need(image.tokens_per_image)
    if described.get("max_len", 0) < need:
        raise ValueError(f"--from {start}: its generator's {described.get('max_len')}-token context cannot hold a "
                         f"retrieved document beside the main one at {image.tokens_per_image} codes per image ({need} "
                         "tokens); give a model whose generators were trained with retrieved documents")
    presets = {part: _preset_of(start / part) if fine_tune else None for part in ("generator", "generator_k0")}
    return start, presets


def _preset_of(generator_dir: Path) -> str:
    """The installed generator preset whose architecture and position rules a trained generator folder has."""
    from dataclasses import asdict

    from racm3.generator.model import RACM3_FILE, GeneratorConfig, get_preset, list_presets

    trained = {**asdict(GeneratorConfig()), **_generator_description(generator_dir / RACM3_FILE)}
    for name in list_presets():
        if asdict(get_preset(name)) == trained:
            return name
    raise ValueError(f"{generator_dir}: its architecture is none of the installed generator presets "
                     f"({', '.join(list_presets())}); fine-tune it with `racm3 train generator --init-from` and its "
                     "PRESET.json")


def _generator_description(path: Path) -> dict:
    """A generator folder's racm3.json "generator" fields (its architecture and position rules)."""
    try:
        described = json.loads(path.read_text(encoding="utf-8"))["generator"]
        if not isinstance(described, dict):
            raise TypeError("its generator field is not an object")
        return described
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable generator description ({exc}); give a model folder written by "
                         "`racm3 train assemble` or `racm3 train all`") from None


def plan(opts: TrainAllOptions, log: Callable[[str], None] = print) -> list[Stage]:
    """The stages, in order; every option is checked here, before anything is written."""
    from dataclasses import replace

    from racm3.generator.data import get_recipe
    from racm3.generator.train import TrainConfig
    from racm3.pipelines import DEFAULT_PIPELINE, read_pipeline
    from racm3.readers import detect_format
    from racm3.retrieval.train_encoder import TrainEncoderConfig
    from racm3.runtime import resolve_device
    from racm3.splits import HELDOUT_SHARE
    from racm3.tokenizers.image import ImageTokenizerConfig
    from racm3.tokenizers.image_train import preset_train_config

    detect_format(opts.dataset)  # a missing or unreadable path fails before OUT is created
    if not opts.steps_scale > 0:
        raise ValueError(f"--steps-scale must be above 0, got {opts.steps_scale}")
    if opts.generator_steps is not None and opts.start is None and opts.generator_steps < 1:
        raise ValueError(f"--generator-steps must be >= 1, got {opts.generator_steps} (0, keeping the generators "
                         "as they are, needs --from MODEL)")
    if opts.generator_steps is not None and opts.start is not None and opts.generator_steps < 0:
        raise ValueError(f"--generator-steps must be >= 0 with --from (0: its generators as they are), got "
                         f"{opts.generator_steps}")
    if opts.start is not None and opts.pipeline is not None:
        raise ValueError(f"--from {opts.start} uses that model's tokenizers and generators, not a pipeline's; drop "
                         f"--pipeline {opts.pipeline} (the encoder trains as pipeline {DEFAULT_PIPELINE} says)")
    if opts.out.exists() and not opts.out.is_dir():
        raise ValueError(f"{opts.out} is a file; give a folder for OUT")
    resolve_device(opts.device)
    pipe = read_pipeline(opts.pipeline or DEFAULT_PIPELINE)
    if opts.start is not None:
        start, presets = _start_model(opts, fine_tune=bool(opts.generator_steps))
        vq_preset, vq_schedule, then = None, {}, None
    else:
        start = None
        presets = {part: opts.generator_preset or pipe[part]["preset"] for part in ("generator", "generator_k0")}
        # --image-tokenizer-preset replaces the pipeline's image tokenizer stage, its "then" training included
        vq_preset = image_tokenizer_preset(opts.image_size, opts.image_tokenizer_preset or
                                           pipe["image_tokenizer"]["preset"])
        vq_schedule = _image_schedule(vq_preset, opts.steps_scale)
        then = None if opts.image_tokenizer_preset else pipe["image_tokenizer"].get("then")  # checked by read_pipeline
        if then is not None:
            vq_schedule["then"] = {"preset": then, **_image_schedule(then, opts.steps_scale)}
        _check_context(presets["generator"], ImageTokenizerConfig.from_preset(vq_preset).tokens_per_image, vq_preset)
    encoder_spec = opts.encoder or pipe["encoder"].get("given")
    given = None if encoder_spec is None else _given_encoder(
        encoder_spec, "--encoder" if opts.encoder else f"pipeline {opts.pipeline or DEFAULT_PIPELINE}'s encoder.given")
    text_given = start / "text_tokenizer" if start else (Path(pipe["text_tokenizer"]["given"])
                                                          if "given" in pipe["text_tokenizer"] else None)

    out = opts.out
    data, model, memory = out / "data", out / "model", out / "memory"
    encoder_dir = given or out / "encoder"
    text_dir = text_given or out / "text_tokenizer"
    image_dir = start / "image_tokenizer" if start else out / "image_tokenizer"
    vocab_size = pipe["text_tokenizer"].get("vocab_size")
    enc_cfg = TrainEncoderConfig(epochs=_scaled(pipe["encoder"].get("epochs", TrainEncoderConfig.epochs),
                                                opts.steps_scale),
                                 precision=pipe["encoder"].get("precision", "auto"), device=opts.device)
    # from nothing: the pipeline's schedule, scaled; fine-tuning (--from and N steps): FINE_TUNE's, from MODEL's
    # generator of that k; --from and 0 steps: MODEL's generators kept
    if start is None:
        schedules = {part: {"steps": opts.generator_steps or _scaled(pipe[part]["steps"], opts.steps_scale)}
                     for part in ("generator", "generator_k0")}
    else:
        steps = opts.generator_steps or 0
        tune = {**FINE_TUNE, "steps": steps, "warmup": min(FINE_TUNE["warmup"], steps // 3)} if steps else None
        schedules = {"generator": tune, "generator_k0": tune}

    def heldout() -> bool:  # the data stage's row counts the held-out documents: no other stage reads them twice
        return _read_row(out, "data")["quality"]["heldout"] > 0

    def make_data() -> dict:
        from racm3.documents import write_jsonl_dataset
        from racm3.readers import ReadReport, read_documents
        from racm3.splits import with_split

        report, splits = ReadReport(), Counter()

        def split_docs():
            for d in read_documents(opts.dataset, report=report):
                d = with_split(d)
                splits[d.meta["split"]] += 1
                yield d

        n = write_jsonl_dataset(split_docs(), data)
        if report.skipped:
            log(report.summary())
        if not n:
            raise ValueError(f"{opts.dataset}: no readable documents (skipped {report.skipped} bad records)")
        return {"documents": n, "train": splits["train"], "heldout": splits["heldout"], "skipped": report.skipped}

    def text_tokenizer() -> dict | None:
        from racm3.readers import read_documents
        from racm3.splits import in_split
        from racm3.tokenizers.text import TextTokenizer, train_text_tokenizer

        if text_given is None:
            tok, _ = train_text_tokenizer(data, text_dir, vocab_size=vocab_size)
        else:
            tok = TextTokenizer.from_pretrained(text_dir)
        captions = [t for d in in_split(read_documents(data), "heldout") for t in d.texts] if heldout() else []
        if not captions:
            return None
        return {"heldout_tokens_per_caption": sum(len(tok.encode(c)) for c in captions) / len(captions)}

    def image_tokenizer() -> dict | None:
        from racm3.tokenizers.image import ImageTokenizer
        from racm3.tokenizers.image_train import evaluate_image_tokenizer, load_split_images, train_image_tokenizer

        if start is None:
            # the first training lives inside the stage's output: deleting the stage's folder redoes both
            first = image_dir / f"first-{Path(vq_preset).stem}" if then else image_dir
            schedule = {k: v for k, v in vq_schedule.items() if k != "then"}
            train_image_tokenizer(data, first, vq_preset, preset_train_config(vq_preset, **schedule,
                                                                              device=opts.device), resume=True)
            if then:  # the second preset's training, from the first's weights
                schedule = {k: v for k, v in vq_schedule["then"].items() if k != "preset"}
                train_image_tokenizer(data, image_dir, then, preset_train_config(then, **schedule, device=opts.device),
                                      resume=True, init_from=first)
        if not heldout():
            return None
        tok = ImageTokenizer.from_pretrained(image_dir)
        r = evaluate_image_tokenizer(tok, load_split_images(data, "heldout", tok.image_size), rfid=False)
        return {"heldout_psnr": r["psnr"], "codebook_usage": r["codebook_usage"],
                "tokens_per_image": r["tokens_per_image"]}

    def encoder() -> None:  # its quality is measured through the memory: the memory stage's recall
        if given is None:
            from racm3.retrieval.train_encoder import train_encoder

            train_encoder(data, encoder_dir, enc_cfg, log=log, resume=True)

    def assemble_tokenizers() -> None:
        from racm3.pretrained import assemble

        # the generators must see image codes as the model folder's (float16) VQ gives them: assembled first
        assemble(model, text_tokenizer=text_dir, image_tokenizer=image_dir, encoder=encoder_dir)

    def build_memory() -> dict | None:
        from racm3.readers import read_documents
        from racm3.retrieval import Memory, load_encoder
        from racm3.retrieval.evaluate import evaluate_retrieval

        if memory.exists():  # left by a run cut short before its row was written: built again from nothing
            shutil.rmtree(memory)
        enc = load_encoder(model / "encoder").to(resolve_device(opts.device))
        with Memory.create(memory, enc.name, enc.dim) as mem:  # every document: retrieval may find held-out ones
            mem.add_documents(list(read_documents(data)), enc)
        if not heldout():
            return None
        r = evaluate_retrieval(memory, data, "heldout", model / "encoder")["through_memory"]
        return {"caption_to_doc_recall@1": r["text_to_image"]["recall@1"],
                "image_to_own_doc_recall@1": r["image_to_text"]["recall@1"]}

    ra_start, k0_start = (start / "generator", start / "generator_k0") if start else (None, None)
    kept = start is not None and schedules["generator"] is None  # MODEL's generators as they are: nothing to train
    ra_dir, k0_dir = (ra_start, k0_start) if kept else (out / "generator", out / "generator_k0")

    def assemble_generators() -> None:
        from racm3.pretrained import SAMPLING_FILE, assemble, read_sampling

        # MODEL's default temperatures go with its generators, kept or fine-tuned from them; else the pipeline's.
        # Written exactly: a sampling.json of an earlier assembly never outlives a pipeline that has none
        if start is not None:
            sampling = read_sampling(start) if (start / SAMPLING_FILE).is_file() else {}
        else:
            sampling = pipe["sampling"]
        assemble(model, sampling=sampling or None, generator=ra_dir, generator_k0=k0_dir)
        if not sampling:
            (model / SAMPLING_FILE).unlink(missing_ok=True)

    def gen_stage(name: str, part: str, k: int, init_from: Path | None) -> Stage:
        if kept:  # its output is MODEL's folder, outside OUT: the row's size is MODEL's, nothing is measured
            return Stage(name, init_from, {"given": str(init_from.resolve())}, lambda: None)
        run_dir, settings = out / part, pipe[part]  # with --from, the default pipeline's batch sizes
        recipe = replace(get_recipe(settings["recipe"]), k=k)
        try:
            training = TrainConfig(dataset=data, out=run_dir, memory=memory if k else None, tokenizers=model,
                                   encoder=model / "encoder", preset=presets[part], **schedules[part],
                                   batch_size=settings["batch_size"], eval_every=settings["eval_every"],
                                   snapshot_every=settings["snapshot_every"],
                                   device=opts.device, resume=True, recipe=recipe, init_from=init_from)
        except ValueError as exc:
            raise ValueError(f"pipeline {opts.pipeline or DEFAULT_PIPELINE}: {part}: {exc}") from None
        # what decides the weights (eval_every and snapshot_every only what is logged); the v2 recipe, the first,
        # is not named
        row = {"preset": presets[part], **schedules[part], "batch_size": settings["batch_size"],
               **({"recipe": settings["recipe"]} if settings["recipe"] != "v2" else {}),
               **({"init_from": str(init_from.resolve())} if init_from else {})}
        return Stage(name, run_dir, row, lambda: _generator_quality(train_generator(training)),
                     training=training)

    given_tok = {"given": str(start.resolve())} if start else None
    given_text = given_tok or ({"given": str(text_given.resolve())} if text_given else None)
    # settings first written without these fields keep their rows: a field is named where it is not the first value
    text_settings = {"vocab_size": vocab_size} if vocab_size not in (2048, None) else {}
    sampling_settings = {"sampling": pipe["sampling"]} if start is None and pipe["sampling"] else {}
    enc_settings = {"epochs": enc_cfg.epochs, **({"precision": enc_cfg.precision}
                                                  if enc_cfg.precision != "auto" else {})}
    return [
        Stage("data", data, {"dataset": str(opts.dataset.resolve()), "heldout_share": HELDOUT_SHARE}, make_data),
        Stage("text-tokenizer", text_dir, given_text or text_settings, text_tokenizer),
        Stage("image-tokenizer", image_dir, given_tok or {"preset": vq_preset, **vq_schedule}, image_tokenizer),
        Stage("encoder", encoder_dir, {"given": str(given.resolve())} if given else enc_settings, encoder),
        Stage("assemble-tokenizers", model, {}, assemble_tokenizers),
        Stage("memory", memory, {"index": "flat"}, build_memory),
        gen_stage("generator", "generator", 2, ra_start),
        gen_stage("generator-k0", "generator_k0", 0, k0_start),
        Stage("assemble-generators", model, sampling_settings, assemble_generators),
    ]


def train_generator(cfg: TrainConfig) -> dict:
    """One generator's training (resumed where it stopped): its last log record. Module-level, so that a
    process of its own can run it (two side by side)."""
    from racm3.generator.train import train

    # a run whose checkpoint is at its last step already returns no record: its log's last one is the same
    return train(cfg) or _last_log_record(cfg.out / "train_log.jsonl")


def _generator_quality(last: dict) -> dict | None:
    """A generator stage's row quality: its last train loss, held-out NLLs and context benefits (on held-out
    documents whose concept is drawn in another style where there are any, else any); None without any."""
    from racm3.generator.train import BENEFITS

    names = {"loss": "train_loss", "nll_none": "heldout_nll_no_context", "nll_self": "heldout_nll_self",
             **{name: name for name in BENEFITS}}
    return {new: last[old] for old, new in names.items() if old in last} or None


def _row_path(out: Path, name: str) -> Path:
    return out / STAGES_DIR / f"{name}.json"


def _read_row(out: Path, name: str) -> dict:
    path = _row_path(out, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8 (a UnicodeDecodeError is a ValueError)
        raise ValueError(f"{path}: not a readable stage row ({exc}); delete it (and the rows of the stages after "
                         f"it) to run stage {name} again") from None


def _last_log_record(path: Path) -> dict:
    """The last record of a generator's train_log.jsonl ({} when it has none)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _done(out: Path, stage: Stage) -> bool:
    """Whether a stage's row and output exist; a row written with other settings is refused (ValueError)."""
    path = _row_path(out, stage.name)
    if not path.is_file() or not stage.output.exists():
        return False
    row = _read_row(out, stage.name)
    if row["settings"] != stage.settings:
        raise ValueError(f"{path}: stage {stage.name} was done with {row['settings']}, not {stage.settings}; give "
                         f"another OUT, or delete {path} (and the rows of the stages after it) to run it again")
    return True


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def train_all(opts: TrainAllOptions, log: Callable[[str], None] = print) -> dict:
    """Run every stage not done yet, in order; write and return the summary (OUT/summary.json)."""
    stages = plan(opts, log)
    done = [_done(opts.out, s) for s in stages]
    if False in done:
        first = done.index(False)
        later = [s.name for s in stages[first + 1:] if _row_path(opts.out, s.name).is_file()]
        if later:  # they were made from the outputs this stage is about to replace
            raise ValueError(f"stage {stages[first].name} is not done but later ones are ({', '.join(later)}); "
                             f"delete their rows in {opts.out / STAGES_DIR} and their folders to train them again")
    pair = [i for i, s in enumerate(stages) if s.training is not None and not done[i]]  # generators to train
    together = len(pair) == 2 and _side_by_side(opts, stages[pair[0]].training)
    rows, ran = [], {}
    for i, (stage, skip) in enumerate(zip(stages, done), 1):
        if skip:
            row = {**_read_row(opts.out, stage.name), "status": "skipped"}
            log(f"[{i}/{len(stages)}] {stage.name}: done already, skipped ({stage.output})")
        else:
            if together and i - 1 == pair[0]:  # both generators now; the second's row is written when its turn comes
                ran = _train_side_by_side([stages[j] for j in pair], log)
            t0 = time.perf_counter()
            seconds, quality = ran[stage.name] if stage.name in ran else (None, stage.run())
            row = {"stage": stage.name, "output": str(stage.output), "settings": stage.settings,
                   "seconds": round(seconds if seconds is not None else time.perf_counter() - t0, 1),
                   "bytes": _size(stage.output), "quality": quality}
            _write_json(_row_path(opts.out, stage.name), row)
            row = {**row, "status": "ran"}
            log(f"[{i}/{len(stages)}] {stage.name}: {row['seconds']:.1f} s, {_human(row['bytes'])} -> {stage.output}")
        rows.append(row)
    summary = {"dataset": str(opts.dataset), "model": str(opts.out / "model"), "memory": str(opts.out / "memory"),
               "stages": rows}
    _write_json(opts.out / SUMMARY_FILE, summary)
    return summary


def _cores() -> int:
    """The cores this process may use (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _side_by_side(opts: TrainAllOptions, training: TrainConfig) -> bool:
    """Whether the two generators train at once, each a process with half the cores: on this project's 2-core
    CPU two one-thread processes train 1.15x the tokens of one two-thread process (README; the shipped
    emoji-small was trained so)."""
    from racm3.runtime import resolve_device

    if opts.side_by_side is not None:
        return opts.side_by_side
    return resolve_device(training.device).type == "cpu" and _cores() >= 2


def _train_in_child(cfg: TrainConfig, results) -> None:
    """A side-by-side process: its training's last record, or the error it stopped with, sent back (the parent
    says it in one line: no traceback from here)."""
    try:
        results.send(("ok", train_generator(cfg)))
    except BaseException as exc:  # noqa: BLE001 - every way out, Ctrl-C included, is the parent's to report
        results.send(("error", exc))


def _train_side_by_side(stages: list[Stage], log: Callable[[str], None]) -> dict[str, tuple[float, dict | None]]:
    """Train the stages' generators at once, one spawned process each with an equal share of the cores; a line
    of progress a minute (their train logs). {name: (seconds, quality)}. A failure is said when it happens; the
    other goes on to its end, then the first failure is raised (each checkpoints: a rerun resumes it). If this
    process is interrupted or terminated, both children are stopped with it.

    The children are spawned, so a script that calls train_all must guard its entry point with
    `if __name__ == "__main__":`, as every use of multiprocessing's spawn does."""
    import multiprocessing
    import signal
    from dataclasses import replace

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, _cores() // len(stages))
    log(f"training {' and '.join(s.name for s in stages)} side by side, {threads} thread(s) each")
    t0, results, errors, children = time.perf_counter(), {}, [], {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops the children too
    try:
        for s in stages:
            receive, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_train_in_child, args=(replace(s.training, threads=threads, progress=False),
                                                              send), name=f"racm3-{s.name}", daemon=True)
            child.start()
            send.close()
            children[s.name] = (child, receive)
        last_log = time.perf_counter()
        while len(results) < len(stages):
            for name, (child, receive) in children.items():
                if name in results or not (receive.poll(1.0 / len(stages)) or not child.is_alive()):
                    continue
                try:
                    status, value = receive.recv()
                except EOFError:  # gone without a word: killed (the kernel's out-of-memory killer, or a user)
                    child.join()
                    status, value = "error", ChildProcessError(
                        f"the {name} process died (exit code {child.exitcode}: killed, or out of memory?); run "
                        "the command again to resume it from its checkpoint")
                child.join()
                results[name] = (time.perf_counter() - t0, value if status == "ok" else None)
                if status != "ok":
                    errors.append(value)
                    log(f"  {name} stopped: {value}" + ("; the other goes on" if len(results) < len(stages) else ""))
            if time.perf_counter() - last_log >= 60 or len(results) == len(stages):
                log("  " + " | ".join(_progress(s) for s in stages))
                last_log = time.perf_counter()
    except BaseException:
        for child, _ in children.values():
            child.terminate()
        for child, _ in children.values():
            child.join()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if errors:
        raise errors[0]
    return {name: (seconds, _generator_quality(last)) for name, (seconds, last) in results.items()}


def _progress(stage: Stage) -> str:
    try:
        last = _last_log_record(stage.training.out / "train_log.jsonl")
    except ValueError:  # a line being written as it is read: the next minute's line has it
        last = {}
    loss = f", loss {last['loss']:.3f}" if "loss" in last else ""
    return f"{stage.name}: step {last.get('step', 0)}/{stage.training.steps}{loss}"


def _write_json(path: Path, obj: dict) -> None:
    """Written whole or not at all (a temporary file renamed): a row is never half there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def format_summary(summary: dict) -> str:
    """The summary as a table: stage, ran or skipped, seconds (of the run that made it), size, held-out quality."""
    lines = [f"{'stage':20s} {'status':8s} {'time':>9s} {'size':>9s}  quality (held-out unless named train)"]
    for r in summary["stages"]:
        quality = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in (r["quality"] or {}).items())
        lines.append(f"{r['stage']:20s} {r['status']:8s} {r['seconds']:>7.1f} s {_human(r['bytes']):>9s}  "
                     f"{quality or '-'}")
    lines.append(f"model: {summary['model']}  memory: {summary['memory']}")
    return "\n".join(lines)
