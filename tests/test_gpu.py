"""On CUDA (skipped without one): a training step of each trainer, resume, DDP over the GPUs, and generation.

Run with `pytest -m gpu` (scripts/gpu_check.sh does, then times a larger training run).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from generator_fixtures import free_port, shape_documents, write_shape_dataset, write_tiny_tokenizers  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_shape_dataset(root / "data")
    write_tiny_tokenizers(root / "tok")
    return root


def test_generator_trains_and_resumes_on_cuda(data, tmp_path):
    from racm3.generator.train import TrainConfig, train
    from racm3.runtime import load_checkpoint

    cfg = TrainConfig(dataset=data / "data", out=tmp_path / "run", tokenizers=data / "tok", preset="tiny", steps=30,
                      batch_size=16, lr=3e-3, warmup=5, log_every=5, eval_every=30, save_every=15, eval_docs=4,
                      progress=False, device="cuda")
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    meta = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert meta["device"].startswith("cuda") and meta["precision"] in ("bf16", "fp16")
    assert log[-1]["main"] < 0.85 * log[0]["main"] and math.isfinite(log[-1]["context_benefit"])
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["step"] == 30
    assert train(replace(cfg, steps=35, resume=True))["step"] == 35


def test_encoder_and_image_tokenizer_train_on_cuda(tmp_path):
    from test_encoder import TINY, shape_docs

    from racm3.retrieval.train_encoder import TrainEncoderConfig, train_encoder
    from racm3.tokenizers.image_train import ImageTrainConfig, train_image_tokenizer

    enc = train_encoder(shape_docs(), tmp_path / "enc", TrainEncoderConfig(epochs=3, batch_size=8, tower=TINY,
                                                                           device="cuda"), progress=False,
                        log=lambda m: None)
    assert enc.embed_image([d.image for d in shape_docs()[:2]]).shape == (2, TINY.dim)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    out = train_image_tokenizer(None, tmp_path / "vq", "tiny", ImageTrainConfig(steps=10, batch_size=8, device="cuda"),
                                images=images, progress=False)
    assert out["steps"] == 10 and (tmp_path / "vq" / "model.safetensors").exists()


def test_generation_on_cuda_matches_the_cpu_in_float32(data, tmp_path):
    from racm3.generator.decode import Sampling, generate_image_codes
    from racm3.generator.model import load_generator
    from racm3.generator.train import TrainConfig, load_tokenizers, train

    train(TrainConfig(dataset=data / "data", out=tmp_path / "run", tokenizers=data / "tok", preset="tiny", steps=10,
                      batch_size=8, eval_docs=2, progress=False, save_dtype="float32", device="cuda"))
    mt = load_tokenizers(data / "tok")
    v, n = mt.vocab, mt.tokens_per_image
    prompt = [v.bos_id, *v.text_to_vocab(mt.text.encode("red circle")), v.img_id]
    base = load_generator(tmp_path / "run").racm3["generator"]["image_base"]
    greedy = Sampling(temperature=0)
    cpu = generate_image_codes(load_generator(tmp_path / "run"), v, [prompt] * 2, n, base, greedy)
    gpu = generate_image_codes(load_generator(tmp_path / "run").cuda(), v, [prompt] * 2, n, base, greedy)
    assert gpu.device.type == "cuda" and (gpu.cpu() == cpu).float().mean() > 0.9  # float32 kernels differ slightly
    g = torch.Generator(device="cuda").manual_seed(0)  # sampling with a generator on the logits' device
    sampled = generate_image_codes(load_generator(tmp_path / "run").cuda(), v, [prompt] * 3, n, base,
                                   Sampling(temperature=1.0, top_p=0.9), generator=g)
    assert sampled.shape == (3, n)


def test_pipeline_on_cuda(tiny_model_dir):
    from racm3.pipeline import RACM3
    from racm3.retrieval.memory import Memory

    model = RACM3.from_pretrained(tiny_model_dir[0], device="cuda")
    assert model.device.type == "cuda"
    with Memory.open(tiny_model_dir[1]) as memory:
        out = model.generate_image("red circle", memory=memory, k=2, num_samples=2, guidance=2.0)
        text = model.generate_text(shape_documents()[0].image, memory=memory, num_samples=2)
    assert out.image.size == (16, 16) and out.sources and text.text


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_two_gpus(data, tmp_path):
    script = (
        "from pathlib import Path; from racm3.generator.train import TrainConfig, train; "
        f"train(TrainConfig(dataset=Path('{data / 'data'}'), out=Path('{tmp_path / 'run'}'), "
        f"tokenizers=Path('{data / 'tok'}'), preset='tiny', steps=10, batch_size=8, log_every=5, eval_every=10, "
        "eval_docs=4, progress=False, device='cuda'))"
    )
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "--no-python", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert meta["world_size"] == 2 and meta["device"] == "cuda:0"
