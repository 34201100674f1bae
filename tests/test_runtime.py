"""The runtime: device and precision choice, checkpoints that round-trip and never unpickle, the resume rule, the
optimizer policy, and a kill mid-save that leaves the previous checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from racm3.runtime import (CheckpointError, DeviceError, bf16_supported, check_resume, load_checkpoint,
                           resolve_device, resolve_precision, save_checkpoint)
from racm3.training import adamw, decay_groups

NO_CUDA = not torch.cuda.is_available()


def test_auto_device_is_cuda_only_where_there_is_one():
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_one_is_one_clear_line():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA device.*--device cpu") as err:
            resolve_device(name)
        assert "\n" not in str(err.value)


def test_precision_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    assert auto.dtype == (torch.bfloat16 if bf16_supported(cpu) else torch.float32)
    assert resolve_precision("fp32", cpu).dtype == torch.float32
    with pytest.raises(DeviceError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="choose auto, bf16, fp16, fp32"):
        resolve_precision("int8", cpu)
    assert not resolve_precision("fp32", cpu).grad_scaler().is_enabled()  # a scaler only for fp16


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
    opt = adamw(decay_groups(model, 0.1), 1e-2, (0.9, 0.95), torch.device("cpu"))
    return model, opt


def _step(model, opt, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (16,), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), (x + 1) % 10)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_checkpoint_round_trip_resumes_exactly_where_the_run_left_off(tmp_path):
    model, opt = _model_and_optimizer()
    for s in range(3):
        _step(model, opt, s)
    rng = np.random.default_rng(7)
    extra = {"step": 3, "config": {"widths": (8, 16), "name": "tiny", "lr": 1e-2, "flags": [True, None]},
             "rng": rng.bit_generator.state, "gen": torch.Generator().manual_seed(3).get_state()}
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, tmp_path / "c.safetensors")
    # the uninterrupted run
    want = [_step(model, opt, s) for s in range(3, 6)]
    # the resumed run, from a fresh process's point of view
    again, again_opt = _model_and_optimizer(seed=1)
    state = load_checkpoint(tmp_path / "c.safetensors")
    again.load_state_dict(state["model"])
    again_opt.load_state_dict(state["optimizer"])
    assert state["config"] == extra["config"] and state["step"] == 3  # tuples stay tuples, None stays None
    resumed_rng = np.random.default_rng()
    resumed_rng.bit_generator.state = state["rng"]
    assert resumed_rng.random() == rng.random()  # numpy's random state survives JSON (its 128-bit integers too)
    assert torch.equal(state["gen"], extra["gen"])
    got = [_step(again, again_opt, s) for s in range(3, 6)]
    assert got == want  # bit-identical continuation: weights, both Adam moments and step counts came back


def test_tied_weights_are_stored_once_and_load_back(tmp_path):
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied, as the generator's input and output embeddings are
    state = {"emb": emb.weight, "head": head.weight}
    save_checkpoint(state, tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 1
    back = load_checkpoint(tmp_path / "t.safetensors")
    assert torch.equal(back["emb"], emb.weight.detach()) and torch.equal(back["head"], emb.weight.detach())


class _Payload:
    """Unpickling this writes a marker file: the proof that a load ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", ["pickle", "truncated", "garbage", "empty"])
def test_a_checkpoint_that_is_not_ours_is_refused_and_runs_nothing(tmp_path, content):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.safetensors"
    if content == "pickle":
        torch.save({"model": _Payload(str(marker))}, path)
    elif content == "truncated":
        save_checkpoint({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(b"\x80\x04garbage" * 10 if content == "garbage" else b"")
    with pytest.raises(CheckpointError, match="checkpoint.safetensors") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "delete it" in str(err.value)
    assert not marker.exists()


def test_one_resume_rule(tmp_path):
    ckpt = tmp_path / "checkpoint.safetensors"
    assert check_resume(ckpt, resume=False) is False  # a fresh folder starts fresh
    assert check_resume(ckpt, resume=True) is False  # nothing to resume: start fresh
    save_checkpoint({"step": 1}, ckpt)
    with pytest.raises(FileExistsError, match="pass --resume"):
        check_resume(ckpt, resume=False)  # never restarted (or resumed) silently
    assert check_resume(ckpt, resume=True) is True


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model, _ = _model_and_optimizer()
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([10, 8])]  # the Linear's matrix only
    emb, norm, lin = model
    assert {id(p) for p in no_decay["params"]} == {id(emb.weight), id(norm.weight), id(norm.bias), id(lin.bias)}


def test_generator_tied_embeddings_do_not_decay():
    from racm3.generator.model import build_model, get_preset
    from racm3.tokenizers.vocab import Vocab

    model = build_model(get_preset("tiny"), Vocab(text_size=300, image_size=64), 16)
    decay, no_decay = decay_groups(model, 0.1)
    emb = model.get_input_embeddings().weight
    assert emb is model.get_output_embeddings().weight
    assert any(p is emb for p in no_decay["params"]) and not any(p is emb for p in decay["params"])
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 7 * 2  # q k v o gate up down


_SAVER = """
import sys, torch
from racm3.runtime import save_checkpoint
path, i = sys.argv[1], 0
while True:
    i += 1
    save_checkpoint({"step": i, "w": torch.full((1_000_000,), float(i))}, path)
    print(i, flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL timing test")
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    for delay in (0.6, 0.75, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == "1"  # one whole checkpoint written
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)  # whichever save completed last, whole
        assert state["step"] >= 1 and torch.equal(state["w"], torch.full((1_000_000,), float(state["step"])))
    save_checkpoint({"step": 0}, path)  # the next save clears what the killed ones left half-written
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_pickles_planted_in_run_folders_are_never_loaded(tmp_path):
    """Every file a trainer reads from its run folder: a planted pickle is refused (or ignored) and runs nothing."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from generator_fixtures import write_shape_dataset, write_tiny_tokenizers
    from test_encoder import TINY, shape_docs

    from racm3.generator.train import TrainConfig, train
    from racm3.retrieval.train_encoder import TrainEncoderConfig, train_encoder
    from racm3.tokenizers.image_train import ImageTrainConfig, train_image_tokenizer

    marker = tmp_path / "pwned"

    def plant(folder: Path, *names: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            torch.save({"x": _Payload(str(marker))}, folder / name)

    write_shape_dataset(tmp_path / "data")
    write_tiny_tokenizers(tmp_path / "tok")
    run = tmp_path / "gen"
    cfg = TrainConfig(dataset=tmp_path / "data", out=run, tokenizers=tmp_path / "tok", preset="tiny", steps=2,
                      batch_size=4, eval_docs=2, progress=False, threads=1)
    plant(run, "cache.json", "cache.pt", "checkpoint.pt")  # the cache is recomputed; old names are never read
    train(cfg)
    plant(run, "checkpoint.safetensors")
    with pytest.raises(CheckpointError):
        train(TrainConfig(**{**cfg.__dict__, "steps": 4, "resume": True}))

    plant(tmp_path / "enc", "checkpoint.safetensors", "checkpoint.pt")
    with pytest.raises(CheckpointError):
        train_encoder(shape_docs(), tmp_path / "enc", TrainEncoderConfig(epochs=1, batch_size=8, tower=TINY),
                      progress=False, log=lambda m: None, resume=True)

    plant(tmp_path / "vq", "checkpoint.safetensors", "checkpoint.pt")
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(CheckpointError):
        train_image_tokenizer(None, tmp_path / "vq", "tiny", ImageTrainConfig(steps=2, batch_size=4), resume=True,
                              images=images, progress=False)
    assert not marker.exists()


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", [
    ["generate", "image", "flag: France", "-k", "0", "--device", "cuda"],
    ["train", "generator", "data", "memory", "out", "--device", "cuda"],
    ["train", "encoder", "data", "out", "--device", "cuda:3"],
    ["train", "image-tokenizer", "data", "out", "--device", "cuda"],
])
def test_cli_device_cuda_without_one_is_one_line_and_writes_nothing(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    from racm3.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, command)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "no CUDA device" in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


_TRAINERS = {
    "generator": """
from pathlib import Path
from racm3.generator.train import TrainConfig, train
train(TrainConfig(dataset=Path(ROOT) / "data", out=Path(ROOT) / "run", tokenizers=Path(ROOT) / "tok", preset="tiny",
                  steps=STEPS, batch_size=4, eval_docs=2, eval_every=10**6, save_every=1, log_every=1, progress=False,
                  threads=1, resume=RESUME))
""",
    "encoder": """
import sys; sys.path.insert(0, TESTS)
from pathlib import Path
from test_encoder import TINY, shape_docs
from racm3.retrieval.train_encoder import TrainEncoderConfig, train_encoder
train_encoder(shape_docs(), Path(ROOT) / "run", TrainEncoderConfig(epochs=STEPS, batch_size=4, tower=TINY, threads=1),
              progress=False, log=lambda m: None, resume=RESUME)
""",
    "image-tokenizer": """
import torch
from pathlib import Path
from racm3.tokenizers.image_train import ImageTrainConfig, train_image_tokenizer
images = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=images)
train_image_tokenizer(None, Path(ROOT) / "run", "tiny", ImageTrainConfig(steps=STEPS, batch_size=4, checkpoint_every=1,
                      log_every=1, threads=1), resume=RESUME, images=images, progress=False)
""",
}


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL timing test")
@pytest.mark.parametrize("trainer", list(_TRAINERS))
def test_a_trainer_killed_while_it_checkpoints_every_step_resumes(tmp_path, trainer):
    """SIGKILL at a random moment of a run that saves at every step (so mid-save, often); --resume then finishes."""
    from pathlib import Path

    from generator_fixtures import write_shape_dataset, write_tiny_tokenizers

    if trainer == "generator":
        write_shape_dataset(tmp_path / "data")
        write_tiny_tokenizers(tmp_path / "tok")
    tests = str(Path(__file__).parent)

    def script(steps: int, resume: bool) -> str:
        return (f"ROOT, TESTS, STEPS, RESUME = {str(tmp_path)!r}, {tests!r}, {steps}, {resume}\n"
                + _TRAINERS[trainer])

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script(10**6, False)], env=env, stderr=subprocess.PIPE)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint in 120 s"
    time.sleep(float(np.random.default_rng().uniform(0.2, 1.0)))  # a few more saves, one maybe half-written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(ckpt)  # the last whole checkpoint
    reached = done["epoch"] if trainer == "encoder" else done["step"]
    run = subprocess.run([sys.executable, "-c", script(reached + 2, True)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    after = load_checkpoint(ckpt)
    assert (after["epoch"] if trainer == "encoder" else after["step"]) == reached + 2
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "config.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_encoder_and_image_tokenizer_train_under_torchrun(tmp_path):
    """Two gloo processes each: DDP keeps one set of weights in both; rank 0 alone writes the run folder."""
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from generator_fixtures import free_port

    from safetensors.torch import load_file

    head = f"""
import os, sys, torch
from pathlib import Path
from safetensors.torch import save_file
sys.path.insert(0, {str(Path(__file__).parent)!r})
root, rank = Path({str(tmp_path)!r}), os.environ["RANK"]
"""
    scripts = {
        "enc": head + """
from test_encoder import TINY, shape_docs
from racm3.retrieval.train_encoder import TrainEncoderConfig, train_encoder
enc = train_encoder(shape_docs(), root / "enc", TrainEncoderConfig(epochs=2, batch_size=8, tower=TINY, threads=1),
                    progress=False, log=lambda m: None)
save_file({k: v.contiguous() for k, v in enc.image_tower.named_parameters()}, str(root / f"enc-rank{rank}.st"))
""",
        "vq": head + """
from racm3.tokenizers.image_train import ImageTrainConfig, train_image_tokenizer
from racm3.tokenizers.image import ImageTokenizer
images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
train_image_tokenizer(None, root / "vq", "tiny", ImageTrainConfig(steps=6, batch_size=4, threads=1, log_every=3,
                      checkpoint_every=3), images=images, progress=False)
""",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, script in scripts.items():
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(free_port()), "--no-python", sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    a, b = load_file(str(tmp_path / "enc-rank0.st")), load_file(str(tmp_path / "enc-rank1.st"))
    # the ranks never diverged: rank 0 returns its tower as saved (float16), rank 1 the float32 one in memory
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].half().float()) for k in a)
    meta = json.loads((tmp_path / "enc" / "training.json").read_text())
    assert meta["world_size"] == 2 and (tmp_path / "enc" / "model.safetensors").exists()
    log = [json.loads(line) for line in (tmp_path / "vq" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]  # rank 0 alone logs
    assert load_checkpoint(tmp_path / "vq" / "checkpoint.safetensors")["step"] == 6
