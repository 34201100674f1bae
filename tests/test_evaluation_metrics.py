"""Metrics against hand-computed and reference values: Frechet distance, FID, CIDEr-D, judges, recall@k."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from PIL import Image, ImageDraw

from racm3.evaluation import (cider, cider_scores, concept_words, fid_from_features, frechet_distance, image_judge,
                              inception_features, name_accuracy, name_match, normalize, recall_at_k)


# --- Frechet distance ------------------------------------------------------------------------------------


def _direct_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula, computed independently of the module."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root))


def test_frechet_distance_matches_direct_computation_on_random_gaussians():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, size=(400, 8))
    y = rng.normal(0.5, 2.0, size=(400, 8)) @ rng.normal(size=(8, 8))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert got == pytest.approx(_direct_frechet(x, y), rel=1e-8)
    assert frechet_distance(x.mean(0), s1, x.mean(0), s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # W2^2 between N(m1, v1) and N(m2, v2) in 1-D: (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2.
    got = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert got == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- FID with Inception features -----------------------------------------------------------------------


def _blobs(colour: tuple[int, int, int], n: int, seed: int) -> list[Image.Image]:
    """n 64x64 white images with one filled ellipse of the colour at a random place and size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (64, 64), "white")
        x0, y0 = rng.integers(2, 24, size=2)
        w, h = rng.integers(20, 38, size=2)
        ImageDraw.Draw(im).ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def features():
    red_a, red_b, blue = _blobs((220, 30, 30), 6, 1), _blobs((220, 30, 30), 6, 2), _blobs((30, 30, 220), 6, 3)
    small = red_a[0].resize((32, 32))  # another size in the same batch: grouped apart, order kept
    f = inception_features(red_a + [small] + red_b + blue, batch_size=32)
    return {"red_a": f[:6], "small": f[6], "red_b": f[7:13], "blue": f[13:], "image": red_a[0]}


def test_inception_features_are_pool3_and_deterministic(features):
    f = features["red_a"]
    assert f.shape == (6, 2048)
    assert (f >= 0).all() and f.max() > 0.1  # pool3 follows a ReLU
    alone = inception_features([features["image"]])
    assert np.allclose(alone[0], f[0], atol=1e-4)  # same image, alone in its batch: same features
    assert not np.allclose(features["small"], f[0], atol=1e-2)  # the resized copy kept its own row


def test_fid_of_a_set_with_itself_is_zero(features):
    assert fid_from_features(features["red_a"], features["red_a"]) == pytest.approx(0.0, abs=1e-3)


def test_fid_separates_different_sets_from_samples_of_the_same_kind(features):
    same = fid_from_features(features["red_a"], features["red_b"])
    different = fid_from_features(features["red_a"], features["blue"])
    assert same > 0
    assert different > 1.5 * same, (same, different)


# --- CIDEr-D ---------------------------------------------------------------------------------------------


def test_cider_known_value():
    # Two items. idf over the references: "a" occurs in both (idf 0), "cat"/"dog"/"a cat"/"a dog" in one
    # (idf log 2). An exact match has cosine 1 on 1- and 2-grams, 0 on the (absent) 3- and 4-grams:
    # mean over n = 0.5, times 10 = 5.0. Swapped captions share only "a" (weight 0): 0.
    refs = {1: ["a cat"], 2: ["a dog"]}
    assert cider({1: "a cat", 2: "a dog"}, refs) == pytest.approx(5.0)
    assert cider({1: "a dog", 2: "a cat"}, refs) == pytest.approx(0.0)
    # Our tokenisation: case and punctuation do not matter.
    assert cider({1: "A cat.", 2: "a  DOG!"}, refs) == pytest.approx(5.0)


def test_cider_ranks_identical_above_unrelated_captions():
    refs = {i: [c] for i, c in enumerate(["flag: France", "thumbs up: dark skin tone", "pizza", "red apple", "grinning face"])}
    same = cider_scores({i: r[0] for i, r in refs.items()}, refs)
    other = cider_scores({i: refs[(i + 1) % 5][0] for i in refs}, refs)
    assert all(same[i] > other[i] for i in refs)
    assert np.mean(list(other.values())) < 0.5 < np.mean(list(same.values()))


def test_cider_requires_matching_ids():
    with pytest.raises(ValueError, match="same ids"):
        cider({1: "a"}, {2: ["a"]})


# --- judges ----------------------------------------------------------------------------------------------


class ColourEncoder:
    """Text: keyword vector over (red, green, blue); image: mean colour minus white. Both L2-normalised."""

    name, dim = "colour", 3
    KEYS = ("red", "green", "blue")

    def embed_text(self, texts):
        v = np.array([[float(k in t.lower()) for k in self.KEYS] for t in texts], np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_image(self, images):
        v = np.array([255.0 - np.asarray(im, np.float32).reshape(-1, 3).mean(0) for im in images], np.float32)
        v = v.max(axis=1, keepdims=True) - v + 1e-3  # the dominant colour channel scores highest
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_image_judge_picks_the_nearest_concept_name():
    names = ["red circle", "green circle", "blue circle"]
    images = _blobs((230, 20, 20), 1, 0) + _blobs((20, 200, 20), 1, 0) + _blobs((20, 20, 230), 1, 0)
    right = image_judge(ColourEncoder(), images, names, names)
    assert right.accuracy == 1.0 and right.predictions == names
    wrong = image_judge(ColourEncoder(), images, ["green circle", "blue circle", "red circle"], names)
    assert wrong.accuracy == 0.0 and wrong.correct == [False] * 3
    with pytest.raises(ValueError, match="missing from the candidate names"):
        image_judge(ColourEncoder(), images[:1], ["purple circle"], names)


def test_drawing_judge_reads_the_concept_of_the_nearest_real_drawing():
    from racm3.evaluation.judge import drawing_judge

    enc = ColourEncoder()
    refs = _blobs((230, 20, 20), 1, 0) + _blobs((20, 200, 20), 1, 0) + _blobs((20, 20, 230), 1, 0)
    ref_concepts = ["tomato", "leaf", "sea"]
    vectors = enc.embed_image(refs)
    generated = _blobs((20, 20, 230), 1, 0) + _blobs((220, 30, 30), 1, 0)  # a sea-like and a tomato-like image
    res = drawing_judge(enc, generated, ["sea", "leaf"], vectors, ref_concepts)
    assert res.predictions == ["sea", "tomato"] and res.correct == [True, False] and res.accuracy == 0.5
    with pytest.raises(ValueError, match="reference vectors"):
        drawing_judge(enc, generated, ["sea", "leaf"], vectors[:2], ref_concepts)


def test_name_match_normalises_and_works_at_concept_level():
    assert normalize("  Flag:   FRANCE. ") == "flag france"
    assert name_match("flag france", "flag: France")
    assert not name_match("flag: Germany", "flag: France", "flag: France")
    assert concept_words("man: light skin tone, red hair") == concept_words("man: red hair")
    # The concept named up to skin tone counts; a caption that merely contains the name does not.
    assert name_match("Thumbs up", "thumbs up: dark skin tone", "thumbs up")
    assert name_match("thumbs up: light skin tone", "thumbs up: dark skin tone", "thumbs up")
    assert not name_match("thumbs up: light skin tone", "thumbs up: dark skin tone")  # no concept: exact only
    assert not name_match("thumbs up and down", "thumbs up", "thumbs up")
    assert not name_match("", "thumbs up", "thumbs up")
    acc = name_accuracy(["pizza", "Pizza!", "pasta"], ["pizza"] * 3)
    assert acc.accuracy == pytest.approx(2 / 3) and acc.correct == [True, True, False]


# --- recall@k --------------------------------------------------------------------------------------------


def test_recall_at_k_against_hand_count():
    I = np.array([[3, 1, 2], [0, 5, 4], [-1, -1, -1], [7, 8, 9]])
    gt = np.array([3, 5, 6, 9])
    assert recall_at_k(I, gt, ks=(1, 2, 3)) == {"recall@1": 0.25, "recall@2": 0.5, "recall@3": 0.75}
    several = np.array([[1, -1], [4, -1], [-1, -1], [8, 9]])  # any correct id counts; -1 pads, never matches
    assert recall_at_k(I, several, ks=(1, 3)) == {"recall@1": 0.0, "recall@3": 0.75}
    with pytest.raises(ValueError, match="recall@5"):
        recall_at_k(I, gt, ks=(5,))


def test_fid_from_features_sample_route_equals_covariance_route():
    # Fewer samples than dimensions takes the singular-value route; compare with the textbook formula.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 10)), rng.normal(1.0, 2.0, size=(9, 10))
    assert fid_from_features(x, y) == pytest.approx(_direct_frechet(x, y), rel=1e-6)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(25, 4))  # more samples than dimensions: covariance route
    assert fid_from_features(x, y) == pytest.approx(_direct_frechet(x, y), rel=1e-8)
