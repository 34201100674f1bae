"""`racm3 data icons`: icon names drawn by several freedesktop themes, from a tiny theme tree the tests make.

The real themes (Debian's tango-icon-theme, gnome-icon-theme, oxygen-icon-theme) are needed only by the last
test, which is skipped without them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli_errors import one_line_error

from racm3.datasets.icons import DEFAULT_THEMES, ICONS_DIR, choose_themes, iter_icon_documents, pick_size
from racm3.readers import read_documents
from racm3.splits import split_of

# Theme folder -> icon directories as its index.theme lists them, (subfolder, Size, Type); "beta" nests
# them under base/ as Oxygen does.
THEMES = {
    "Alpha": [("16x16/actions", 16, "Fixed"), ("32x32/actions", 32, "Fixed"), ("scalable/actions", 48, "Scalable")],
    "beta": [("base/8x8/apps", 8, "Threshold"), ("base/24x24/apps", 24, "Threshold"),
             ("base/48x48/apps", 48, "Threshold")],
    "gamma": [("32x32/actions", 32, "Fixed"), ("64x64/actions", 64, "Fixed")],
}
# Icon name -> theme -> the sizes it is drawn at.
ICONS = {
    "document-print-preview": {"Alpha": (16, 32), "beta": (24, 48), "gamma": (32, 64)},
    "edit-copy": {"Alpha": (32,), "beta": (48,)},
    "tiny-icon": {"Alpha": (16,), "beta": (8,), "gamma": (32,)},  # Alpha's 16 is upscaled, beta's 8 too small
    "lonely-icon": {"Alpha": (32,)},  # one theme only: dropped
    "broken-icon": {"Alpha": (32,), "beta": (48,), "gamma": (32,)},  # Alpha's file is corrupt
    **{f"thing-{i}": {"Alpha": (32,), "gamma": (64,)} for i in range(12)},  # enough names for both splits
}


def colour(theme: str, px: int) -> tuple[int, int, int]:
    """Each theme and size is its own solid colour, so a test can tell which PNG was picked."""
    return (px * 3, 40 + 60 * sorted(THEMES).index(theme), 200)


def make_icon_tree(root: Path) -> Path:
    for theme, dirs in THEMES.items():
        folder = root / theme
        entries = "\n\n".join(f"[{sub}]\nSize={size}\nContext=Actions\nType={kind}" for sub, size, kind in dirs)
        folder.mkdir(parents=True)
        (folder / "index.theme").write_text(f"[Icon Theme]\nName={theme}\nName[de]={theme}\n"
                                            f"Directories={','.join(d[0] for d in dirs)}\n\n{entries}\n")
        by_size = {size: folder / sub for sub, size, _ in dirs}
        for sub in by_size.values():
            sub.mkdir(parents=True)
        if theme == "Alpha":  # SVGs are not read: a name drawn only as an SVG is not drawn
            (folder / "scalable" / "actions" / "edit-copy.svg").write_text("<svg/>")
        for name, drawn in ICONS.items():
            for px in drawn.get(theme, ()):
                # A transparent border around an opaque square: composited on white, the corners are white.
                image = Image.new("RGBA", (px, px), (0, 0, 0, 0))
                image.paste(Image.new("RGBA", (px // 2, px // 2), colour(theme, px) + (255,)), (px // 4, px // 4))
                image.save(by_size[px] / f"{name}.png")
    (root / "Alpha" / "32x32" / "actions" / "editcopy.png").symlink_to("edit-copy.png")  # an alias: one drawing
    (root / "Alpha" / "32x32" / "actions" / "broken-icon.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "default").mkdir()  # a cursor theme: an index.theme without icon directories is no icon theme
    (root / "default" / "index.theme").write_text("[Icon Theme]\nInherits=Alpha\n")
    return root


@pytest.fixture(scope="module")
def icon_tree(tmp_path_factory) -> Path:
    return make_icon_tree(tmp_path_factory.mktemp("icons"))


@pytest.fixture(scope="module")
def built(icon_tree):
    stats: Counter = Counter()
    docs = list(iter_icon_documents(icon_tree, ("alpha", "beta", "gamma"), size=32, stats=stats))
    return docs, stats


def test_documents_captions_and_metadata(built):
    docs, _ = built
    by_id = {d.id: d for d in docs}
    d = by_id["beta-document-print-preview"]
    assert d.text == "document print preview" and d.concept == "document-print-preview" and d.style == "beta"
    assert d.segments[0] is d.image and d.image.size == (32, 32) and d.image.mode == "RGB"
    assert {d.style for d in docs} == {"alpha", "beta", "gamma"}  # theme names in lower case, as --themes takes
    assert all(d.split in ("train", "heldout") and d.meta["icon_size"] >= 16 for d in docs)
    assert len(by_id) == len(docs)


def test_names_in_one_theme_and_aliases_are_dropped(built):
    docs, stats = built
    concepts = Counter(d.concept for d in docs)
    assert "lonely-icon" not in concepts
    assert "editcopy" not in concepts and concepts["edit-copy"] == 2  # the symlink is the same drawing
    assert stats[("alpha", "alias")] == 1
    assert all(n >= 2 for n in concepts.values())
    # Counted before decoding: every name but lonely-icon; in all three, document-print-preview and broken-icon
    # (tiny-icon's beta drawing is too small).
    assert stats["names"] == len(ICONS) - 1 and stats["names in all themes"] == 2


def test_nearest_size_rule(built):
    docs, stats = built
    by_id = {d.id: d for d in docs}

    def picked(doc_id: str) -> int:
        return by_id[doc_id].meta["icon_size"]

    # Exact where it exists (not 64 for gamma), else the nearest larger (48, not 24), else a smaller one of at
    # least half the size, upscaled (Alpha's 16); beta's 8 px tiny-icon is too small to be a drawing.
    assert (picked("alpha-document-print-preview"), picked("beta-document-print-preview"),
            picked("gamma-document-print-preview")) == (32, 48, 32)
    assert picked("alpha-tiny-icon") == 16 and "beta-tiny-icon" not in by_id
    assert stats[("beta", "too small")] == 1 and stats[("alpha", "upscaled")] == 1
    assert pick_size({16, 32, 256}, 64) == 256 and pick_size({16, 32}, 64) == 32 and pick_size({16, 24}, 64) is None
    # The picked PNG's colour survives the resampling; the transparent border is white.
    pixels = np.asarray(by_id["beta-document-print-preview"].image)
    assert tuple(pixels[16, 16]) == colour("beta", 48) and tuple(pixels[0, 0]) == (255, 255, 255)


def test_corrupt_file_is_skipped_and_counted(built):
    docs, stats = built
    assert stats[("alpha", "unreadable")] == 1
    assert sorted(d.style for d in docs if d.concept == "broken-icon") == ["beta", "gamma"]


def test_split_is_by_name(built, icon_tree):
    docs, _ = built
    splits: dict[str, set] = {}
    for d in docs:
        splits.setdefault(d.concept, set()).add(d.split)
    assert all(len(s) == 1 for s in splits.values())  # every drawing of a name in the same split
    assert {s for (s,) in splits.values()} == {"train", "heldout"}
    # The rule of data without a split (racm3.splits), by name: the same whichever themes are chosen.
    assert {c: s for c, (s,) in splits.items()} == {c: split_of(c) for c in splits}
    two = {d.concept: d.split for d in iter_icon_documents(icon_tree, ("gamma", "alpha"), size=32)}
    assert two and all(splits[c] == {s} for c, s in two.items())


def test_theme_errors_name_what_to_do(icon_tree, tmp_path):
    with pytest.raises(ValueError, match=r"unknown theme 'tango'; themes found in .*: alpha, beta, gamma \(install"):
        choose_themes(DEFAULT_THEMES, icon_tree)
    with pytest.raises(FileNotFoundError, match=r"no icon themes found in .*nothing; install them with: apt-get "
                                                r"install .*tango-icon-theme gnome-icon-theme oxygen-icon-theme"):
        choose_themes(DEFAULT_THEMES, tmp_path / "nothing")


def test_cli_writes_a_dataset_that_reads_back(icon_tree, built, tmp_path):
    from typer.testing import CliRunner

    from racm3.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["data", "icons", str(tmp_path / "x"), "--icons-dir", str(icon_tree)])
    assert bad.exit_code == 1 and "unknown theme 'tango'" in bad.output and not (tmp_path / "x").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    one_line_error(runner.invoke(app, ["data", "icons", str(a_file), "--icons-dir", str(icon_tree),
                                       "--themes", "alpha,beta"]), f"{a_file} is a file; give a folder")

    out = tmp_path / "icons"
    result = runner.invoke(app, ["data", "icons", str(out), "--icons-dir", str(icon_tree),
                                 "--themes", "alpha,Beta,gamma", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert f"wrote {len(built[0])} documents" in result.output
    assert "alpha      train" in result.output and "unreadable or not square: 1" in result.output
    records = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    assert records[0]["segments"][0]["image"].startswith("images/")
    back = list(read_documents(out))
    assert [(d.id, d.text, d.split, d.concept) for d in back] == [(d.id, d.text, d.split, d.concept) for d in built[0]]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(back, built[0]))


REAL = all((ICONS_DIR / folder / "index.theme").exists() for folder in ("Tango", "gnome", "oxygen"))


@pytest.mark.skipif(not REAL, reason="needs Debian's tango-icon-theme, gnome-icon-theme and oxygen-icon-theme")
def test_real_themes_give_plausible_counts():
    stats: Counter = Counter()
    docs = list(iter_icon_documents(size=64, limit=40, stats=stats))
    # Measured with the Debian 12 packages: 282 names (170 in all three themes), 734 documents at 64 px.
    assert 200 <= stats["names"] <= 1000 and stats["names in all themes"] >= 100
    assert 80 <= len(docs) <= 120 and len({d.concept for d in docs}) == 40
    assert {d.style for d in docs} == set(DEFAULT_THEMES)
    for d in docs[::7]:
        pixels = np.asarray(d.image)
        assert d.image.size == (64, 64) and (pixels != 255).any(axis=-1).sum() > 100  # a drawing, not blank
