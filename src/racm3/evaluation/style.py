"""A tiny art-style classifier (Twemoji vs OpenMoji): logistic regression on outline and colour statistics."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

STYLES = ("twemoji", "openmoji")  # label 0, label 1
SIZE = 64  # features are computed at the data set's resolution


def style_features(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, 21) statistics that tell the styles apart.

    OpenMoji draws every shape with a thick black outline; Twemoji draws flat colour with no outline. So:
    the share of near-black pixels, of strong edges, of edges that are dark, of dark pixels touching light
    ones (an outline's signature), plus luminance and saturation histograms.
    """
    from racm3.documents import to_rgb

    arr = np.stack([np.asarray(to_rgb(im).resize((SIZE, SIZE), Image.BOX) if im.size != (SIZE, SIZE)
                               else to_rgb(im), dtype=np.float32) for im in images]) / 255.0  # (n, S, S, 3)
    lum, mx = arr.mean(axis=3), arr.max(axis=3)  # (n, S, S)
    sat = mx - arr.min(axis=3)
    dark = mx < 0.25
    # Edge strength: the larger of the horizontal and vertical luminance steps, on the (S-1, S-1) grid.
    grad = np.maximum(np.abs(np.diff(lum, axis=1))[:, :, :-1], np.abs(np.diff(lum, axis=2))[:, :-1, :])
    edge = grad > 0.2
    dark_edge = edge & dark[:, :-1, :-1]
    light = lum > 0.6
    near_light = np.zeros_like(dark)
    for shift, axis in ((1, 1), (-1, 1), (1, 2), (-1, 2)):
        near_light |= np.roll(light, shift, axis=axis)
    outline = dark & near_light
    n_pix = SIZE * SIZE

    def share(mask, of):
        return mask.reshape(len(mask), -1).sum(1) / np.maximum(of.reshape(len(of), -1).sum(1), 1)

    cols = [dark.mean((1, 2)), (mx < 0.1).mean((1, 2)), edge.mean((1, 2)), share(dark_edge, edge),
            (lum > 0.97).mean((1, 2)), sat.mean((1, 2)), (sat > 0.5).mean((1, 2)),
            outline.mean((1, 2)), share(outline, dark)]
    lum_hist = np.stack([((lum >= lo) & (lum < lo + 0.125)).sum((1, 2)) for lo in np.arange(8) * 0.125], 1) / n_pix
    sat_hist = np.stack([((sat >= lo) & (sat < lo + 0.25)).sum((1, 2)) for lo in np.arange(4) * 0.25], 1) / n_pix
    lum_hist[:, -1] += (lum >= 1.0).sum((1, 2)) / n_pix  # the top bin is closed, as np.histogram's is
    sat_hist[:, -1] += (sat >= 1.0).sum((1, 2)) / n_pix
    return np.concatenate([np.stack(cols, 1), lum_hist, sat_hist], axis=1).astype(np.float64)


@dataclass
class StyleClassifier:
    """Standardised features -> logistic regression; P(openmoji) = sigmoid(w . (x - mean) / std + b)."""

    mean: list[float]
    std: list[float]
    weight: list[float]
    bias: float
    heldout_accuracy: float | None = None

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.std) == len(self.weight)):
            raise ValueError("mean, std and weight must have one entry per feature")

    def proba_openmoji(self, images: Sequence[Image.Image]) -> np.ndarray:
        z = (style_features(images) - np.array(self.mean)) / np.array(self.std)  # (n, F)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weight) + self.bias)))

    def predict(self, images: Sequence[Image.Image]) -> list[str]:
        return [STYLES[int(p > 0.5)] for p in self.proba_openmoji(images)]

    def accuracy(self, images: Sequence[Image.Image], styles: Sequence[str]) -> float:
        return float(np.mean([p == s for p, s in zip(self.predict(images), styles)]))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model_type": "racm3-style-classifier", "styles": STYLES, **asdict(self)}))
        os.replace(tmp, path)  # atomic: a crash never leaves half a file
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StyleClassifier":
        data = json.loads(Path(path).read_text())
        if data.get("model_type") != "racm3-style-classifier":
            raise ValueError(f"{path}: not a style classifier file; delete it and it will be retrained")
        return cls(data["mean"], data["std"], data["weight"], data["bias"], data.get("heldout_accuracy"))


def train_style_classifier(images: Sequence[Image.Image], styles: Sequence[str], l2: float = 1e-3,
                           steps: int = 200) -> StyleClassifier:
    """Full-batch L-BFGS on the logistic loss + l2 * |w|^2 (deterministic; seconds for thousands of images)."""
    import torch

    bad = sorted(set(styles) - set(STYLES))
    if bad:
        raise ValueError(f"unknown styles {bad}; expected {STYLES}")
    if len(set(styles)) < 2:
        raise ValueError("the training images must hold both styles")
    x = style_features(images)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.tensor((x - mean) / std, dtype=torch.float64)  # (n, F)
    y = torch.tensor([STYLES.index(s) for s in styles], dtype=torch.float64)  # (n,)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return StyleClassifier(mean.tolist(), std.tolist(), w.detach().tolist(), float(b.detach()))


def load_or_train_style_classifier(dataset_dir: str | os.PathLike, cache: str | os.PathLike | None = None,
                                   log=print) -> StyleClassifier:
    """The classifier cached at `cache` (default runs/style_classifier.json), else trained on the data set's
    train split and scored on its held-out split (~1 minute on 2 cores, mostly reading PNGs)."""
    from racm3.readers import read_documents

    cache = Path(cache) if cache is not None else Path("runs") / "style_classifier.json"
    if cache.exists():
        return StyleClassifier.load(cache)
    docs = [d for d in read_documents(dataset_dir) if d.image is not None and d.meta.get("style") in STYLES]
    train = [d for d in docs if d.meta.get("split") == "train"]
    heldout = [d for d in docs if d.meta.get("split") != "train"]
    if not train:
        raise ValueError(f"{dataset_dir}: no train-split documents in styles {STYLES}")
    log(f"training the style classifier on {len(train)} drawings (cached in {cache})")
    clf = train_style_classifier([d.image for d in train], [d.meta["style"] for d in train])
    if heldout:
        clf.heldout_accuracy = clf.accuracy([d.image for d in heldout], [d.meta["style"] for d in heldout])
    clf.save(cache)
    return clf
