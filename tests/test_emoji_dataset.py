"""The embedded emoji data set: CLDR names, concepts, the split, and the built set's contents."""

from collections import Counter

import numpy as np
import pytest

from racm3.datasets.emoji import cldr_name, iter_emoji_documents, list_emoji, split_concepts


@pytest.mark.parametrize("char, package_name, name, concept", [
    ("🇫🇷", ":France:", "flag: France", "flag: France"),
    ("🇨🇮", ":Côte_d’Ivoire:", "flag: Côte d’Ivoire", "flag: Côte d’Ivoire"),
    ("🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", ":England:", "flag: England", "flag: England"),
    ("👍🏿", ":thumbs_up_dark_skin_tone:", "thumbs up: dark skin tone", "thumbs up"),
    ("🍕", ":pizza:", "pizza", "pizza"),
    ("#️⃣", ":keycap_#:", "keycap: #", "keycap: #"),
    ("👱🏽‍♂️", ":man_medium_skin_tone_blond_hair:", "man: medium skin tone, blond hair", "man: blond hair"),
    ("👨‍👩‍👦", ":family_man_woman_boy:", "family: man, woman, boy", "family: man, woman, boy"),
    ("👨🏿‍❤️‍💋‍👨🏻", ":kiss_man_man_dark_skin_tone_light_skin_tone:",
     "kiss: man, man, dark skin tone, light skin tone", "kiss: man, man"),
    ("🧑🏻‍🤝‍🧑🏿", ":people_holding_hands_light_skin_tone_dark_skin_tone:",
     "people holding hands: light skin tone, dark skin tone", "people holding hands"),
    ("🆎", ":AB_button_(blood_type):", "AB button (blood type)", "AB button (blood type)"),
])
def test_cldr_names_are_restored(char, package_name, name, concept):
    assert cldr_name(char, package_name) == (name, concept)


def test_split_is_by_concept_and_deterministic_per_seed():
    concepts = {e.concept for e in list_emoji()}
    a, b, c = split_concepts(concepts, 0), split_concepts(concepts, 0), split_concepts(concepts, 1)
    assert a == b and a != c
    held = sum(v == "heldout" for v in a.values()) / len(a)
    assert 0.18 < held < 0.22


@pytest.fixture(scope="module")
def emoji_docs():
    return list(iter_emoji_documents(size=64, seed=0))


def test_full_set_has_two_styles_of_real_images(emoji_docs):
    docs = emoji_docs
    assert len(docs) >= 7000
    styles = Counter(d.style for d in docs)
    assert set(styles) == {"twemoji", "openmoji"}
    assert min(sum(1 for d in docs if d.style == s and d.meta["flag"]) for s in styles) >= 250
    for d in docs:
        assert d.image.size == (64, 64) and d.image.mode == "RGB"
        assert d.text and d.text.strip() == d.text
    # A drawing, not a blank frame: every image has non-white pixels, and its border is white.
    for d in docs[::97]:
        pixels = np.asarray(d.image)
        assert (pixels != 255).any(axis=-1).sum() > 100
        assert (pixels[0, 0] == 255).all()


def test_no_concept_in_both_splits(emoji_docs):
    split_of: dict[str, set] = {}
    for d in emoji_docs:
        split_of.setdefault(d.concept, set()).add(d.split)
    assert all(len(s) == 1 for s in split_of.values())
    # Skin-tone variants follow their base: every "thumbs up" document lands in one split.
    assert len({d.split for d in emoji_docs if d.text.startswith("thumbs up")}) == 1


def test_cli_writes_docs_jsonl(tmp_path):
    from typer.testing import CliRunner

    from racm3.cli import app

    # A third style that isn't installed must fail clearly, not write half a data set.
    result = CliRunner().invoke(app, ["data", "emoji", str(tmp_path / "x"), "--styles", "nosuch"])
    assert result.exit_code != 0
    assert "unknown style 'nosuch'" in result.output
    assert not (tmp_path / "x" / "docs.jsonl").exists()
