"""VQ image tokenizer: quantizer invariant, shapes, save/load, and a tiny model that learns to reconstruct."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from racm3.runtime import bf16_supported
from racm3.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, image_tokenizer_presets
from racm3.tokenizers.image_train import ImageTrainConfig, evaluate_image_tokenizer, psnr, train_image_tokenizer


def _shapes(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: coloured rectangles and discs on white, like flat emoji art."""
    rng = np.random.default_rng(seed)
    out = np.full((n, size, size, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [int(rng.integers(2, 6))]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if i % 2 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        out[i][mask] = colour
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def test_presets_are_data_with_the_documented_grids():
    assert {"tiny", "emoji-8x8", "emoji-16x16"} <= set(image_tokenizer_presets())
    assert ImageTokenizerConfig.from_preset("emoji-8x8").grid == (8, 8)
    assert ImageTokenizerConfig.from_preset("emoji-16x16").tokens_per_image == 256
    assert ImageTokenizerConfig.from_preset("emoji-8x8").codebook_size >= 512
    with pytest.raises(ValueError, match="divisible"):
        ImageTokenizerConfig(image_size=60, channels=(8, 16, 16, 16))
    with pytest.raises(ValueError, match="preset"):
        ImageTokenizerConfig.from_preset("huge")


def test_quantized_latents_are_codebook_rows_at_the_returned_indices():
    torch.manual_seed(0)
    tok = ImageTokenizer("tiny")
    x = _shapes(6).float() / 255
    tok.train()
    tok(x)  # first training batch: k-means initialises the codebook
    tok.eval()
    q, codes, _ = tok.quantize(x)  # [B, N, D], [B, N]
    assert codes.shape == (6, tok.tokens_per_image) and codes.dtype == torch.long
    assert torch.allclose(q, tok.quantizer.codebook[codes], atol=1e-6)  # no projection: the rows themselves
    assert torch.allclose(q, tok.lookup(codes), atol=1e-6)
    assert torch.allclose(tok.decode(codes), tok.decode_latents(q).clamp(0, 1), atol=1e-6)


def test_tiny_round_trip_shapes_and_pil(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer("tiny").eval()
    pils = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]  # 2nd is resized
    codes = tok.encode(pils)
    assert codes.shape == (2, 16) and 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
    assert torch.equal(codes, tok.encode(tok.to_tensor(pils)))  # PIL and tensor inputs agree
    images = tok.decode(codes)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    out = tok.to_pil(images)
    assert [im.size for im in out] == [(16, 16)] * 2 and out[0].mode == "RGB"
    with pytest.raises(ValueError, match="codes"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))


def test_save_load_fp32_fp16_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    tok = ImageTokenizer("tiny")
    x = _shapes(4).float() / 255
    tok.train(); tok(x); tok.eval()
    tok.save_pretrained(tmp_path / "fp32")
    again = ImageTokenizer.from_pretrained(tmp_path / "fp32")
    assert torch.equal(again.encode(x), tok.encode(x))
    assert torch.allclose(again.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    tok.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    half = ImageTokenizer.from_pretrained(tmp_path / "fp16")
    assert (half.decode(tok.encode(x)) - tok.decode(tok.encode(x))).abs().max() < 0.02
    with pytest.raises(FileNotFoundError, match="racm3 train image-tokenizer"):
        ImageTokenizer.from_pretrained(tmp_path / "missing")
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    cfg["latent_dim"] = 4
    (tmp_path / "fp32" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        ImageTokenizer.from_pretrained(tmp_path / "fp32")


def test_tiny_training_beats_untrained_and_resumes(tmp_path):
    images = _shapes(16)
    torch.manual_seed(0)
    before = evaluate_image_tokenizer(ImageTokenizer("tiny"), images, rfid=False)["psnr"]
    cfg = ImageTrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=10, checkpoint_every=30, log_every=30,
                           precision="fp32")
    train_image_tokenizer(None, tmp_path, "tiny", cfg, images=images, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_image_tokenizer(None, tmp_path, "tiny", cfg, images=images, progress=False)
    cfg = ImageTrainConfig(steps=120, batch_size=8, lr=3e-3, warmup=10, checkpoint_every=30, log_every=30,
                           precision="fp32")
    summary = train_image_tokenizer(None, tmp_path, "tiny", cfg, resume=True, images=images, progress=False)
    assert summary["steps"] == 120
    after = evaluate_image_tokenizer(ImageTokenizer.from_pretrained(tmp_path), images, rfid=False)
    print(f"tiny VQ PSNR untrained {before:.2f} dB -> trained {after['psnr']:.2f} dB")
    assert after["psnr"] > before + 5 and after["psnr"] > 16.0
    assert after["tokens_per_image"] == 16 and 0 < after["codebook_usage"] <= 1


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bf16 matrix units")
def test_bf16_autocast_training_learns_as_well(tmp_path):
    images = _shapes(16)
    torch.manual_seed(0)
    before = evaluate_image_tokenizer(ImageTokenizer("tiny"), images, rfid=False)["psnr"]
    cfg = ImageTrainConfig(steps=120, batch_size=8, lr=3e-3, warmup=10, checkpoint_every=60, log_every=60,
                           precision="bf16")
    train_image_tokenizer(None, tmp_path, "tiny", cfg, images=images, progress=False)
    after = evaluate_image_tokenizer(ImageTokenizer.from_pretrained(tmp_path), images, rfid=False)["psnr"]
    assert after > before + 5 and after > 16.0


def test_psnr_known_answer():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-4)


def test_rfid_is_the_projects_one_fid():
    from racm3.evaluation.fid import fid
    from racm3.tokenizers.image_train import reconstruction_fid

    a, b = _shapes(4, seed=0), _shapes(4, seed=1)
    assert reconstruction_fid(a, a) == pytest.approx(0.0, abs=1e-3)
    pil = lambda x: [Image.fromarray(im) for im in x.permute(0, 2, 3, 1).numpy()]  # noqa: E731
    assert reconstruction_fid(a, b) == pytest.approx(fid(pil(a), pil(b)), rel=1e-9) and reconstruction_fid(a, b) > 1


@pytest.mark.parametrize("quantizer", [
    {"quantizer": "fsq", "fsq_levels": [5, 4, 3]},  # 60 implicit codes
    {"codebook_size": 64, "codebook_dim": 4},  # LlamaGen-style: l2-normalised codes looked up in 4 dimensions
])
def test_fsq_and_low_dim_vq_latents_are_the_lookup_of_their_codes(quantizer, tmp_path):
    torch.manual_seed(0)
    cfg = ImageTokenizerConfig(image_size=16, channels=(8, 16, 16), latent_dim=8, **quantizer)
    tok = ImageTokenizer(cfg)
    x = _shapes(6).float() / 255
    tok.train()
    tok(x)
    tok.eval()
    q, codes, _ = tok.quantize(x)
    assert codes.shape == (6, 16) and 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
    assert torch.allclose(q, tok.lookup(codes), atol=1e-5)
    assert torch.allclose(tok.decode(codes), tok.decode_latents(q).clamp(0, 1), atol=1e-5)
    if "fsq_levels" in quantizer:
        assert tok.codebook_size == 60 and len(torch.unique(tok.lookup(torch.arange(60)[None]), dim=1)[0]) == 60
    tok.save_pretrained(tmp_path)
    again = ImageTokenizer.from_pretrained(tmp_path)
    assert again.config == tok.config and torch.equal(again.encode(x), tok.encode(x))
    assert again.code_fingerprint() == tok.code_fingerprint()


def test_quantizer_settings_are_checked():
    with pytest.raises(ValueError, match="fsq_levels"):
        ImageTokenizerConfig(image_size=16, channels=(8, 16), quantizer="fsq")
    with pytest.raises(ValueError, match="fsq_levels is for"):
        ImageTokenizerConfig(image_size=16, channels=(8, 16), fsq_levels=(4, 4))
    with pytest.raises(ValueError, match="each >= 3"):
        ImageTokenizerConfig(image_size=16, channels=(8, 16), quantizer="fsq", fsq_levels=(2, 4))
    with pytest.raises(ValueError, match="drop codebook_size"):
        ImageTokenizerConfig(image_size=16, channels=(8, 16), quantizer="fsq", fsq_levels=(4, 4), codebook_size=99)
    assert ImageTokenizerConfig(image_size=16, channels=(8, 16)).codebook_size == 1024  # vq's default
    with pytest.raises(ValueError, match="quantizer must be"):
        ImageTokenizerConfig(image_size=16, channels=(8, 16), quantizer="lfq")
    assert ImageTokenizerConfig(image_size=16, channels=(8, 16), quantizer="fsq", fsq_levels=[8, 8, 8, 6, 5]).codebook_size == 15360


def test_preset_files_and_their_training_settings(tmp_path):
    from racm3.tokenizers.image_train import preset_train_config

    assert preset_train_config("emoji-8x8").precision == "fp32"  # the shipped VQ's reproduction
    assert preset_train_config("emoji-8x8", steps=7).steps == 7  # an option beats the preset
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"model": {"image_size": 16, "channels": [8, 16], "quantizer": "fsq",
                                         "fsq_levels": [4, 4]}, "train": {"perceptual_weight": 0.5}}))
    assert ImageTokenizerConfig.from_preset(own).codebook_size == 16
    assert preset_train_config(own).perceptual_weight == 0.5
    for bad, message in [({"model": {"image_size": 16, "channels": [8, 16], "depth": 3}}, "unknown"),
                         ({"model": {}, "extra": 1}, "a preset is")]:
        own.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            ImageTokenizerConfig.from_preset(own)
    for train, message in [({"stepz": 3}, "stepz"), ({"perceptual_weight": -1}, "perceptual_weight"),
                           ({"gan_weight": 0.1}, "unknown fields \\['gan_weight'\\]"),
                           ({"device": "cuda"}, "belong to the machine")]:
        own.write_text(json.dumps({"model": {}, "train": train}))
        with pytest.raises(ValueError, match=message):
            preset_train_config(own)
    with pytest.raises(ValueError, match="choose a preset from .*emoji-8x8"):
        ImageTokenizerConfig.from_preset("nope")


def test_perceptual_distance_is_zero_on_itself_and_grows_with_blur():
    from racm3.tokenizers.image_losses import PerceptualLoss

    perceptual = PerceptualLoss()
    x = torch.nn.functional.interpolate(_shapes(4, size=16).float() / 255, size=64, mode="nearest")
    slight = x.clone()
    slight[..., 30:34, 30:34] = 0.5  # a few pixels changed
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    assert perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < perceptual(slight, x).item() < perceptual(blurred, x).item()
    y = blurred.clone().requires_grad_(True)
    perceptual(y, x).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0 and all(p.grad is None for p in perceptual.parameters())
    with pytest.raises(ValueError, match="64x64"):
        perceptual(x[..., :32, :32], x[..., :32, :32])


def test_training_with_the_perceptual_term_checkpoints_and_resumes(tmp_path):
    from racm3.runtime import load_checkpoint

    preset = tmp_path / "sharp.json"
    preset.write_text(json.dumps({"model": {"image_size": 64, "channels": [8, 8, 16], "latent_dim": 8,
                                            "quantizer": "fsq", "fsq_levels": [5, 5, 5]},
                                  "train": {"perceptual_weight": 0.1, "batch_size": 4, "warmup": 1,
                                            "checkpoint_every": 3, "log_every": 3, "precision": "fp32"}}))
    images = torch.nn.functional.interpolate(_shapes(8).float(), size=64, mode="nearest").round().to(torch.uint8)
    from racm3.tokenizers.image_train import preset_train_config

    train_image_tokenizer(None, tmp_path / "run", preset, preset_train_config(preset, steps=3), images=images,
                          progress=False)
    first = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    train_image_tokenizer(None, tmp_path / "run", preset, preset_train_config(preset, steps=6), images=images,
                          progress=False, resume=True)
    assert any(not torch.equal(first["model"][n], t) for n, t in load_checkpoint(
        tmp_path / "run" / "checkpoint.safetensors")["model"].items())  # it trained on after the resume
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    assert log[-1]["perceptual"] > 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["step"] == 6
    tok = ImageTokenizer.from_pretrained(tmp_path / "run")
    assert tok.config.quantizer == "fsq" and tok.tokens_per_image == 256
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(preset.read_text()), "model": {
        **json.loads(preset.read_text())["model"], "fsq_levels": [5, 5, 4]}}))
    with pytest.raises(ValueError, match="another architecture.*fsq_levels"):
        train_image_tokenizer(None, tmp_path / "run", other, preset_train_config(other, steps=9), images=images,
                              progress=False, resume=True)
    with pytest.raises(ValueError, match="at least 64 px"):
        small = tmp_path / "small.json"
        small.write_text(json.dumps({"model": {"image_size": 16, "channels": [8, 16]}, "train": {"perceptual_weight": 1}}))
        train_image_tokenizer(None, tmp_path / "small-run", small, images=images, progress=False)
    assert not (tmp_path / "small-run").exists()  # refused before anything was written


@pytest.mark.parametrize("size", [64, 128, 256])
def test_v2_presets_give_every_image_size_16x16_codes(size):
    from racm3.tokenizers.image_train import preset_train_config

    tok = ImageTokenizer(f"v2-{size}").eval()
    assert tok.image_size == size and tok.grid == (16, 16) and tok.codebook_size == 15360
    codes = tok.encode(torch.rand(2, 3, size, size))
    assert codes.shape == (2, 256) and tok.decode(codes).shape == (2, 3, size, size)
    train = preset_train_config(f"v2-{size}")
    assert train.perceptual_weight > 0


def test_decoder_only_fine_tuning_keeps_every_code_and_sharpens(tmp_path):
    """--init-from with decoder_only: the encoder and the VQ codebook (EMA included) stay, so the code fingerprint a
    generator recorded and each image's codes are unchanged, while the decoder learns."""
    images = _shapes(16)
    torch.manual_seed(0)
    cfg = ImageTrainConfig(steps=30, batch_size=8, lr=3e-3, warmup=5, checkpoint_every=30, log_every=30,
                           precision="fp32")
    train_image_tokenizer(None, tmp_path / "base", "tiny", cfg, images=images, progress=False)
    base = ImageTokenizer.from_pretrained(tmp_path / "base")
    tune = ImageTrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, checkpoint_every=30, log_every=30,
                            precision="fp32", decoder_only=True)
    with pytest.raises(ValueError, match="--init-from"):
        train_image_tokenizer(None, tmp_path / "none", "tiny", tune, images=images, progress=False)
    train_image_tokenizer(None, tmp_path / "tuned", "tiny", tune, images=images, progress=False,
                          init_from=tmp_path / "base")
    tuned = ImageTokenizer.from_pretrained(tmp_path / "tuned")
    assert tuned.code_fingerprint() == base.code_fingerprint()
    x = images.float() / 255
    assert torch.equal(tuned.encode(x), base.encode(x))
    assert any(not torch.equal(a, b) for a, b in zip(tuned.decoder.state_dict().values(),
                                                      base.decoder.state_dict().values()))
    with pytest.raises(ValueError, match="trained its decoder alone .* resume it with decoder_only True"):
        train_image_tokenizer(None, tmp_path / "tuned", "tiny", cfg, images=images, progress=False, resume=True)
    before = evaluate_image_tokenizer(base, images, rfid=False)["psnr"]
    after = evaluate_image_tokenizer(tuned, images, rfid=False)["psnr"]
    assert after > before, (before, after)  # 60 more decoder steps on the same codes reconstruct better
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"image_size": 16, "channels": [8, 16, 16], "codebook_size": 16}}))
    with pytest.raises(ValueError, match="another architecture than preset .*codebook_size"):
        train_image_tokenizer(None, tmp_path / "o", other, tune, images=images, progress=False,
                              init_from=tmp_path / "base")
