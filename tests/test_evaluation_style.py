"""The style classifier learns outlined (OpenMoji-like) vs flat (Twemoji-like) drawings and round-trips through JSON."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from racm3.evaluation.style import StyleClassifier, style_features, train_style_classifier


def _drawings(n: int, outlined: bool, seed: int) -> list[Image.Image]:
    """64x64 drawings of random flat-coloured shapes; `outlined` adds a thick black outline as OpenMoji does."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (64, 64), "white")
        d = ImageDraw.Draw(im)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = (int(v) for v in rng.integers(2, 30, size=2))
            x1, y1 = x0 + int(rng.integers(14, 32)), y0 + int(rng.integers(14, 32))
            fill = tuple(int(v) for v in rng.integers(60, 255, size=3))
            shape = d.ellipse if rng.random() < 0.5 else d.rectangle
            shape([x0, y0, x1, y1], fill=fill, outline=(0, 0, 0) if outlined else None, width=3 if outlined else 0)
        out.append(im)
    return out


def test_style_classifier_beats_chance_on_held_out_drawings(tmp_path):
    flat, outlined = _drawings(30, False, 0), _drawings(30, True, 1)
    clf = train_style_classifier(flat[:20] + outlined[:20], ["twemoji"] * 20 + ["openmoji"] * 20)
    held_images, held_styles = flat[20:] + outlined[20:], ["twemoji"] * 10 + ["openmoji"] * 10
    assert clf.accuracy(held_images, held_styles) >= 0.9
    again = StyleClassifier.load(clf.save(tmp_path / "style.json"))
    assert again.predict(held_images) == clf.predict(held_images)
    assert np.allclose(again.proba_openmoji(held_images), clf.proba_openmoji(held_images))


def test_style_features_shape_and_size_invariance():
    im = _drawings(1, True, 2)[0]
    f = style_features([im, im.resize((128, 128), Image.NEAREST)])
    assert f.shape == (2, 21)
    assert np.allclose(f[0, 9:17].sum(), 1.0)  # the luminance histogram covers every pixel
    assert np.allclose(f[0], f[1], atol=1e-6)  # a 2x copy (box-filtered back to 64) is the same drawing


def test_style_classifier_rejects_unknown_styles():
    with pytest.raises(ValueError, match="unknown styles"):
        train_style_classifier(_drawings(2, False, 3), ["twemoji", "noto"])
