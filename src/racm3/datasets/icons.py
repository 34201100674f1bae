"""A second real data set: freedesktop icon names drawn by several of Debian's desktop icon themes.

Each icon name (`document-print-preview`) is drawn by several themes, so it is a concept drawn in several art
styles, like an emoji in Twemoji and OpenMoji: a held-out name's drawing in one theme can sit in memory while
another theme's drawing of it is asked for. The themes install offline from Debian (see APT_INSTALL); nothing is
downloaded. Only PNGs are read (no SVG renderer is a dependency): Tango, for one, ships PNGs up to 32 px only.
"""

from __future__ import annotations

import configparser
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from racm3.documents import BadRecord, Document, load_image
from racm3.splits import split_of

ICONS_DIR = Path("/usr/share/icons")
DEFAULT_THEMES = ("tango", "gnome", "oxygen")
APT_INSTALL = "apt-get install --no-install-recommends tango-icon-theme gnome-icon-theme oxygen-icon-theme"

# Theme (lower-case folder name) -> (Debian package, license), from each package's debian/copyright.
LICENSES = {
    "tango": ("tango-icon-theme", "public-domain"),
    "gnome": ("gnome-icon-theme", "GPL-2+"),
    "oxygen": ("oxygen-icon-theme", "LGPL-3+"),
    "adwaita": ("adwaita-icon-theme", "LGPL-3 or CC-BY-SA-3.0"),
}


def caption(name: str) -> str:
    """`document-print-preview` -> "document print preview" (legacy names use '_': `stock_print-preview`)."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def find_themes(icons_dir: Path = ICONS_DIR) -> dict[str, Path]:
    """Lower-case theme name -> folder, for every folder of icons_dir whose index.theme lists icon directories
    (a cursor-only theme such as `default` lists none)."""
    found = {}
    for index in sorted(Path(icons_dir).glob("*/index.theme"), key=lambda p: str(p).lower()):
        if _theme_directories(index):
            found[index.parent.name.lower()] = index.parent
    return found


def choose_themes(names: tuple[str, ...], icons_dir: Path = ICONS_DIR) -> dict[str, Path]:
    """The chosen themes' folders; a one-line error when none are installed or a name is not among them."""
    found = find_themes(icons_dir)
    if not found:
        raise FileNotFoundError(f"no icon themes found in {icons_dir}; install them with: {APT_INSTALL}")
    if len(names) < 2:
        raise ValueError("choose at least two themes: each icon name is kept only where two themes draw it")
    for name in names:
        if name.lower() not in found:
            raise ValueError(f"unknown theme {name!r}; themes found in {icons_dir}: {', '.join(found)} "
                             f"(install Tango, GNOME and Oxygen with: {APT_INSTALL})")
    return {name.lower(): found[name.lower()] for name in names}


def _theme_directories(index: Path) -> list[tuple[str, int]]:
    """(subfolder, pixel size) of each icon directory index.theme lists (freedesktop icon theme spec)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(index, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return []
    if not parser.has_section("Icon Theme"):
        return []
    head = parser["Icon Theme"]
    listed = ",".join((head.get("Directories", ""), head.get("ScaledDirectories", "")))
    out = []
    for sub in filter(None, (d.strip() for d in listed.split(","))):
        if parser.has_section(sub):
            try:  # Size is the nominal size; a Scale=2 directory holds icons of twice as many pixels
                out.append((sub, int(parser[sub]["Size"]) * int(parser[sub].get("Scale", "1"))))
            except (KeyError, ValueError):
                continue
    return out


def theme_pngs(folder: Path) -> dict[str, dict[int, Path]]:
    """Icon name -> {pixel size: PNG} of one theme. Scalable directories count by their nominal size (Oxygen
    keeps 256 px PNGs in some); SVGs are not read."""
    icons: dict[str, dict[int, Path]] = defaultdict(dict)
    for sub, px in _theme_directories(folder / "index.theme"):
        for path in sorted((folder / sub).glob("*.png")):
            icons[path.stem].setdefault(px, path)  # one name in two contexts (places/ and status/): the first
    return icons


def pick_size(sizes: dict[int, Path] | set[int], size: int) -> int | None:
    """The requested size, else the nearest larger (downscaling keeps detail), else the largest if it is at
    least half the size (Tango's 32 px for 64), else None: a 22 px icon blown up to 64 is a blur, not a drawing."""
    larger = [s for s in sizes if s >= size]
    if larger:
        return min(larger)
    return max(sizes) if 2 * max(sizes) >= size else None


@dataclass(frozen=True)
class Drawing:
    theme: str
    name: str
    path: Path
    px: int  # the nominal size of the PNG picked


def select_drawings(themes: dict[str, Path], size: int, stats: Counter | None = None) -> dict[str, list[Drawing]]:
    """Icon name -> its drawings (one per theme, at least two themes), before any image is decoded.

    A theme often reaches one file under several names (symlinks: `editcopy.png -> edit-copy.png`). Each
    file is kept once, so that aliases cannot put the same drawing in both splits under two names; it goes
    under the alias most of the chosen themes draw (so it pairs with their drawings), else the file's own name.
    """
    stats = stats if stats is not None else Counter()
    picked: dict[str, dict[str, Drawing]] = {}
    for theme, folder in themes.items():
        picked[theme] = {}
        for name, sizes in theme_pngs(folder).items():
            px = pick_size(sizes, size)
            if px is None:
                stats[(theme, "too small")] += 1
                continue
            picked[theme][name] = Drawing(theme, name, sizes[px], px)
    drawn_by = Counter(name for by_name in picked.values() for name in by_name)

    by_name: dict[str, list[Drawing]] = defaultdict(list)
    for theme, drawings in picked.items():
        same_file: dict[str, list[Drawing]] = defaultdict(list)
        for d in drawings.values():
            same_file[os.path.realpath(d.path)].append(d)
        for real, group in same_file.items():
            stem = Path(real).stem
            keep = min(group, key=lambda d: (-drawn_by[d.name], d.name != stem, d.name))
            stats[(theme, "alias")] += len(group) - 1
            by_name[keep.name].append(keep)
    kept = {name: sorted(ds, key=lambda d: d.theme) for name, ds in sorted(by_name.items()) if len(ds) >= 2}
    stats["names"] = len(kept)
    stats["names in all themes"] = sum(len(ds) == len(themes) for ds in kept.values())
    return kept


def draw(d: Drawing, size: int) -> Image.Image:
    """The PNG as a size x size RGB image: transparency on white first (no dark fringes), then resampled."""
    image = load_image(d.path, name=f"{d.theme}: {d.path}")  # BadRecord for a corrupt or truncated file
    if image.width != image.height:  # animation strips (process-working) are not one drawing
        raise BadRecord(f"{d.theme}: {d.path}: not square ({image.width}x{image.height})")
    return image if image.size == (size, size) else image.resize((size, size), Image.LANCZOS)


def iter_icon_documents(icons_dir: Path = ICONS_DIR, themes: tuple[str, ...] = DEFAULT_THEMES, size: int = 64,
                        limit: int | None = None, stats: Counter | None = None) -> Iterator[Document]:
    """One document per icon name per theme: [image, caption], with style, concept, split, source, license.

    The themes are checked and the names chosen when this is called (a bad theme fails before anything is
    written); images are decoded as the documents are read. The split is the name's (racm3.splits.split_of, a
    hash of the name), so it does not depend on the themes chosen, on --limit or on an unreadable file.
    A file that cannot be decoded is skipped and counted; a name left with one drawing is dropped ("lone").
    """
    stats = stats if stats is not None else Counter()
    names = select_drawings(choose_themes(themes, icons_dir), size, stats)
    if not names:
        raise ValueError(f"no icon name is drawn by two of the themes {', '.join(themes)} in {icons_dir}")
    return _documents(names, size, list(names)[:limit], stats)


def _documents(names: dict[str, list[Drawing]], size: int, chosen: list[str], stats: Counter) -> Iterator[Document]:
    for name in chosen:
        split = split_of(name)
        drawn = []
        for d in names[name]:
            try:
                drawn.append((d, draw(d, size)))
            except BadRecord:
                stats[(d.theme, "unreadable")] += 1
        if len(drawn) < 2:
            stats["lone"] += 1
            continue
        for d, image in drawn:
            stats[(d.theme, split)] += 1
            stats[(d.theme, "upscaled")] += d.px < size
            source, license_ = LICENSES.get(d.theme, (f"{d.theme} icon theme", None))
            meta = {"style": d.theme, "concept": name, "split": split, "source": source,
                    "license": license_, "icon_size": d.px}
            yield Document(id=f"{d.theme}-{name}", segments=(image, caption(name)),
                           meta={k: v for k, v in meta.items() if v is not None})
