"""Training-efficiency curves from snapshots and in-context style control, with fake models of known behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from racm3.evaluation.efficiency import find_snapshots, plot_efficiency, training_efficiency
from racm3.evaluation.incontext import style_control
from tests.test_evaluation_knowledge import KeywordColourEncoder, _docs, drawing, mean_colour
from racm3.pipeline import Output


class SnapshotModel:
    """RACM3's constructor shape; its generator is the snapshot's step: from step 200 on it draws the concept."""

    def __init__(self, tokenizer, generator, encoder):
        self.tokenizer, self.generator, self.encoder = tokenizer, generator, encoder

    def generate_image(self, text, memory=None, k=2, num_samples=2, guidance=3.0, seed=0, demos=None):
        good = self.generator >= 200 and (k > 0 or self.generator >= 300)
        return Output(image=drawing(text if good else "black", "twemoji"))


def _snapshots(root, steps):
    for s in steps:
        (root / f"step-{s}").mkdir(parents=True)
        (root / f"step-{s}" / "config.json").write_text("{}")
    (root / "not-a-step").mkdir()
    return root


def test_find_snapshots_orders_by_step(tmp_path):
    run = _snapshots(tmp_path / "run", [300, 100, 200])
    assert [s for s, _ in find_snapshots(run)] == [100, 200, 300]
    with pytest.raises(FileNotFoundError, match="no generator snapshots"):
        find_snapshots(tmp_path / "run" / "not-a-step")


def test_training_efficiency_curves_and_plot(tmp_path):
    ra = _snapshots(tmp_path / "ra", [100, 200])
    base = _snapshots(tmp_path / "base", [100, 200, 300])
    load = lambda folder: int(folder.name.split("-")[1])  # noqa: E731  the fake generator is its step
    model = SnapshotModel(None, 0, KeywordColourEncoder())
    res = training_efficiency(model, {"RA-CM3": (ra, 2), "baseline": (base, 0)}, memory="unused", docs=_docs(),
                              limit=4, features_fn=mean_colour, load=load, log=lambda m: None)
    ra_curve = [(p["step"], p["judge_accuracy"]) for p in res["curves"]["RA-CM3"]]
    base_curve = [(p["step"], p["judge_accuracy"]) for p in res["curves"]["baseline"]]
    assert ra_curve == [(100, 0.0), (200, 1.0)]
    assert base_curve == [(100, 0.0), (200, 0.0), (300, 1.0)]
    assert res["curves"]["RA-CM3"][1]["fid"] < res["curves"]["RA-CM3"][0]["fid"]
    png = plot_efficiency(res, tmp_path / "curve.png")
    assert Image.open(png).size[0] > 400
    json.dumps(res)  # the result is plain JSON


class DemoStyleModel:
    """Draws the caption's concept; in the demos' style when given demos, else flat (Twemoji-like)."""

    encoder = KeywordColourEncoder()

    def generate_image(self, text, memory=None, k=2, num_samples=2, guidance=3.0, seed=0, demos=None):
        style = demos[0].meta["style"] if demos else "twemoji"
        return Output(image=drawing(text, style))


class OutlineClassifier:
    """OpenMoji if the drawing's corner of the square is black (the outline)."""

    heldout_accuracy = 1.0

    def predict(self, images):
        return ["openmoji" if np.asarray(im)[12, 12].max() < 50 else "twemoji" for im in images]


def test_style_control_measures_steering():
    res = style_control(DemoStyleModel(), _docs(), OutlineClassifier(), limit=8, log=lambda m: None)
    assert res["queries"] == 4  # one caption per held-out concept
    assert res["styles"]["openmoji"] == {"share_with_demos": 1.0, "share_without": 0.0, "judge_accuracy_with_demos": 1.0}
    assert res["styles"]["twemoji"]["share_with_demos"] == 1.0 and res["styles"]["twemoji"]["share_without"] == 1.0
    assert res["steered"] == 1.0 and res["judge_accuracy_without"] == 1.0
