"""Procedural cartoon faces with CelebA-style labels, for trying `sia` without CelebA.

Each of the 15 attributes in `ATTRIBUTES` is drawn as a visible feature and can be switched on its
own. A few combinations cannot be drawn together, so `resolve_conflicts` settles them:

* Black_Hair, Blond_Hair and Brown_Hair are mutually exclusive; with none of them on the hair is
  grey or red (a nuisance draw). When several are on, the first in that order is kept.
* Bald wins over Bangs (a bald head has no fringe); Bald keeps tufts at the sides, so hair colour
  stays visible.
* When a correlation `(A, B, P)` has just set B, B wins any conflict it creates (setting
  Bangs on makes the face not Bald; setting Blond_Hair on turns the other colours off), so the
  requested correlation survives unless a later correlation undoes it.

Everything else is independent on purpose: the only label correlations are the ones asked for.
Nuisance variation (face shape, placement, rotation, skin tone, background, lighting, noise) is
drawn from the rng first and in a fixed order, so one rng state with one attribute flipped gives
the same face with only that feature changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sia_cli.errors import SiaError

ATTRIBUTES = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
    "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Smiling",
    "Wearing_Lipstick", "Young",
)
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair")
LANDMARK_NAMES = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")

# Base rates of the independent attributes; hair colour is one categorical draw (rest: grey/red).
BASE_RATES = {
    "Bald": 0.15, "Bangs": 0.4, "Bushy_Eyebrows": 0.4, "Eyeglasses": 0.35, "Male": 0.5,
    "Mouth_Slightly_Open": 0.45, "Mustache": 0.35, "No_Beard": 0.6, "Pale_Skin": 0.4,
    "Smiling": 0.5, "Wearing_Lipstick": 0.45, "Young": 0.6,
}
HAIR_RATES = (0.3, 0.25, 0.25)

MARKER = ".sia_synth.json"
IMAGE_NAME = re.compile(r"^\d{6}\.png$")

HAIR_RGB = {"Black_Hair": (28, 22, 22), "Blond_Hair": (226, 192, 110), "Brown_Hair": (100, 62, 36)}
GREY_HAIR, RED_HAIR = (160, 158, 155), (205, 85, 30)
IRIS_RGB = ((70, 45, 25), (50, 90, 150), (60, 110, 60))
LIPSTICK, MOUTH_INSIDE, TEETH = (205, 18, 45), (70, 18, 24), (240, 238, 230)
FRAME_RGB = (22, 22, 28)


# ----------------------------------------------------------------------------- labels


def check_attribute(name: str) -> str:
    if name not in ATTRIBUTES:
        raise SiaError(f"unknown attribute {name!r}; valid: {', '.join(ATTRIBUTES)}")
    return name


def check_correlations(correlations) -> list[tuple[str, str, float]]:
    """Validate `(A, B, P)` triples; unknown names or P outside [0, 1] are user errors."""
    checked = []
    for a, b, p in correlations:
        check_attribute(a), check_attribute(b)
        if a == b:
            raise SiaError(f"correlation {a} -> {b} links an attribute with itself")
        if not 0.0 <= float(p) <= 1.0:
            raise SiaError(f"correlation {a} -> {b} has probability {p}; it must be within [0, 1]")
        checked.append((a, b, float(p)))
    return checked


def parse_correlation(spec: str) -> tuple[str, str, float]:
    """Parse `A:B:P` (e.g. `Eyeglasses:Bangs:0.99`) into a checked triple."""
    parts = [part.strip() for part in spec.split(":")]
    if len(parts) != 3:
        raise SiaError(f"malformed correlation {spec!r}; expected ATTR_A:ATTR_B:P, e.g. Eyeglasses:Bangs:0.99")
    try:
        p = float(parts[2])
    except ValueError:
        raise SiaError(f"malformed correlation {spec!r}: {parts[2]!r} is not a probability") from None
    return check_correlations([(parts[0], parts[1], p)])[0]


def resolve_conflicts(attrs: dict[str, bool], keep: str | None = None) -> dict[str, bool]:
    """Return a copy where at most one hair colour is on and Bald and Bangs are not both on.

    `keep` names an attribute that wins any conflict it takes part in (see the module docstring).
    """
    out = {name: bool(attrs.get(name, False)) for name in ATTRIBUTES}
    colours = [c for c in HAIR_COLOURS if out[c]]
    if len(colours) > 1:
        winner = keep if keep in colours else colours[0]
        for c in colours:
            out[c] = c == winner
    if out["Bald"] and out["Bangs"]:
        out["Bald" if keep == "Bangs" else "Bangs"] = False
    return out


def sample_attributes(rng: np.random.Generator, correlations=()) -> dict[str, bool]:
    """Draw one label vector; each correlation `(A, B, P)` then sets B = A with probability P."""
    correlations = check_correlations(correlations)
    draws = rng.random(len(BASE_RATES))
    attrs = {name: bool(u < BASE_RATES[name]) for name, u in zip(BASE_RATES, draws)}
    hair = np.searchsorted(np.cumsum(HAIR_RATES), rng.random(), side="right")
    for i, colour in enumerate(HAIR_COLOURS):
        attrs[colour] = bool(hair == i)
    attrs = resolve_conflicts(attrs)
    for (a, b, p), u in zip(correlations, rng.random(len(correlations))):
        if u < p:
            attrs[b] = attrs[a]
            attrs = resolve_conflicts(attrs, keep=b)
    return attrs


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Nuisance:
    """Everything about a face that no label describes; drawn first so labels never shift it."""

    half_w: float  # face half-width as a fraction of the canvas
    aspect: float
    cx: float
    cy: float
    angle: float  # degrees, counter-clockwise
    skin_t: float  # position within the (pale or non-pale) skin range
    skin_jitter: np.ndarray
    bg_colours: np.ndarray
    bg_angle: float
    light_angle: float
    light_strength: float
    hair_shade: float
    red_not_grey: bool
    shirt: np.ndarray
    eye_spread: float
    eye_shift: float
    mouth_shift: float
    mouth_width: float
    iris: int
    noise_sigma: float
    noise: np.ndarray


def draw_nuisance(rng: np.random.Generator, size: int) -> Nuisance:
    return Nuisance(
        half_w=rng.uniform(0.22, 0.27),
        aspect=rng.uniform(1.18, 1.32),
        cx=0.5 + rng.uniform(-0.05, 0.05),
        cy=0.53 + rng.uniform(-0.04, 0.04),
        angle=rng.uniform(-10, 10),
        skin_t=rng.uniform(0, 1),
        skin_jitter=rng.normal(0, 6, 3),
        bg_colours=rng.uniform(25, 235, (2, 3)),
        bg_angle=rng.uniform(0, 2 * math.pi),
        light_angle=rng.uniform(0, 2 * math.pi),
        light_strength=rng.uniform(0, 0.3),
        hair_shade=rng.uniform(0.8, 1.12),
        red_not_grey=bool(rng.random() < 0.5),
        shirt=rng.uniform(20, 235, 3),
        eye_spread=rng.uniform(0.35, 0.41),
        eye_shift=rng.uniform(-0.04, 0.04),
        mouth_shift=rng.uniform(-0.03, 0.03),
        mouth_width=rng.uniform(0.27, 0.33),
        iris=int(rng.integers(len(IRIS_RGB))),
        noise_sigma=rng.uniform(2, 6),
        noise=rng.standard_normal((size, size, 3)).astype(np.float32),
    )


def _mix(c1, c2, t: float) -> tuple[int, int, int]:
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(c1, c2))


def _scale(c, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(x * f)))) for x in c)


@dataclass(frozen=True)
class Palette:
    skin: tuple
    shade: tuple  # lines and shadows on the skin
    hair: tuple
    facial_hair: tuple
    lips: tuple


def make_palette(attrs: dict[str, bool], nz: Nuisance) -> Palette:
    if attrs["Pale_Skin"]:
        skin = _mix((240, 212, 196), (252, 236, 226), nz.skin_t)
    else:
        skin = _mix((118, 76, 52), (222, 172, 136), nz.skin_t)
    skin = tuple(np.clip(np.array(skin) + nz.skin_jitter, 0, 255))
    colour = next((c for c in HAIR_COLOURS if attrs[c]), None)
    hair = HAIR_RGB[colour] if colour else (RED_HAIR if nz.red_not_grey else GREY_HAIR)
    hair = _scale(hair, nz.hair_shade)
    if not attrs["Young"]:  # age: duller skin, greying hair
        grey = sum(skin) / 3
        skin = _mix(skin, (grey, grey, grey), 0.3)
        hair = _mix(hair, (185, 185, 185), 0.4)
    skin = _scale(skin, 1.0)  # back to integer channels for Pillow
    lips = LIPSTICK if attrs["Wearing_Lipstick"] else _mix(skin, (150, 72, 72), 0.45)
    return Palette(skin, _scale(skin, 0.62), hair, _scale(hair, 0.75), lips)


@dataclass(frozen=True)
class Frame:
    """Face geometry in canvas pixels, before rotation."""

    cx: float
    cy: float
    a: float  # half-width
    b: float  # half-height
    eye_y: float
    eye_dx: float
    brow_y: float
    hairline_y: float
    nose_y: float
    mouth_y: float
    mouth_w: float

    def half_width_at(self, y: float) -> float:
        t = min(1.0, abs(y - self.cy) / self.b)
        return self.a * math.sqrt(1 - t * t)


def make_frame(nz: Nuisance, canvas: int) -> Frame:
    a = nz.half_w * canvas
    b = a * nz.aspect
    cx, cy = nz.cx * canvas, nz.cy * canvas
    eye_y = cy - (0.08 - nz.eye_shift) * b
    return Frame(
        cx=cx, cy=cy, a=a, b=b, eye_y=eye_y, eye_dx=nz.eye_spread * a, brow_y=eye_y - 0.2 * b,
        hairline_y=cy - 0.55 * b, nose_y=cy + 0.22 * b, mouth_y=cy + (0.5 + nz.mouth_shift) * b,
        mouth_w=nz.mouth_width * a,
    )


def head_outline(f: Frame, male: bool, grow: float = 1.0, points: int = 96) -> list[tuple]:
    """Upper half an ellipse; lower half a superellipse: squarer and wider jaw when male."""
    exponent, widen = (3.2, 1.06) if male else (1.8, 0.96)
    out = []
    for t in np.linspace(0, 2 * math.pi, points, endpoint=False):
        c, s = math.cos(t), math.sin(t)
        if s > 0:  # image y points down: s > 0 is the jaw
            w = 1 + (widen - 1) * s
            x = w * math.copysign(abs(c) ** (2 / exponent), c)
            y = math.copysign(abs(s) ** (2 / exponent), s)
        else:
            x, y = c, s
        out.append((f.cx + grow * f.a * x, f.cy + grow * f.b * y))
    return out


def _ellipse(d: ImageDraw.ImageDraw, x: float, y: float, rx: float, ry: float, **kw) -> None:
    d.ellipse((x - rx, y - ry, x + rx, y + ry), **kw)


def _line(d: ImageDraw.ImageDraw, pts, colour, width: float) -> None:
    d.line([tuple(p) for p in pts], fill=colour, width=max(1, int(round(width))), joint="curve")


def draw_body(d, f: Frame, attrs, pal: Palette, nz: Nuisance) -> None:
    shirt = tuple(int(v) for v in nz.shirt)
    _ellipse(d, f.cx, f.cy + 2.25 * f.b, 2.1 * f.a, 1.1 * f.b, fill=shirt)
    long_hair = not attrs["Male"] and not attrs["Bald"]
    if long_hair:
        d.rounded_rectangle((f.cx - 1.22 * f.a, f.cy - 0.6 * f.b, f.cx + 1.22 * f.a, f.cy + 1.15 * f.b),
                            radius=0.5 * f.a, fill=pal.hair)
    neck = _scale(pal.skin, 0.86)
    d.rectangle((f.cx - 0.42 * f.a, f.cy + 0.5 * f.b, f.cx + 0.42 * f.a, f.cy + 1.3 * f.b), fill=neck)
    for side in (-1, 1):
        _ellipse(d, f.cx + side * 0.98 * f.a, f.eye_y + 0.1 * f.b, 0.13 * f.a, 0.2 * f.b, fill=neck)


def draw_hair_top(d, f: Frame, attrs, pal: Palette) -> None:
    if attrs["Bald"]:  # tufts above the ears keep the hair colour visible
        for side in (-1, 1):
            _ellipse(d, f.cx + side * 0.93 * f.a, f.eye_y - 0.12 * f.b, 0.13 * f.a, 0.2 * f.b, fill=pal.hair)
        return
    ex, ey, rx, ry = f.cx, f.cy - 0.04 * f.b, 1.1 * f.a, 1.1 * f.b
    phi = math.degrees(math.asin(min(1.0, (ey - f.hairline_y) / ry)))
    d.chord((ex - rx, ey - ry, ex + rx, ey + ry), 180 + phi, 360 - phi, fill=pal.hair)
    if attrs["Bangs"]:
        draw_bangs(d, f, pal)


def draw_bangs(d, f: Frame, pal: Palette) -> None:
    bottom = f.brow_y - 0.06 * f.b
    half = f.half_width_at(bottom) * 1.02
    teeth = 7
    edge = []
    for i in range(2 * teeth + 1):  # zigzag strands along the fringe's lower edge
        x = f.cx + half - i * (2 * half) / (2 * teeth)
        edge.append((x, bottom + (0.06 * f.b if i % 2 else 0.0)))
    top = f.hairline_y - 0.05 * f.b
    d.polygon([(f.cx - half * 1.05, top), (f.cx + half * 1.05, top)] + edge, fill=pal.hair)


def draw_wrinkles(d, f: Frame, pal: Palette) -> None:
    w = 0.035 * f.b
    for k in range(3):
        y = f.hairline_y + (0.1 + 0.08 * k) * f.b
        _line(d, [(f.cx - 0.45 * f.a, y + 0.02 * f.b), (f.cx, y), (f.cx + 0.45 * f.a, y + 0.02 * f.b)], pal.shade, w)
    for side in (-1, 1):
        corner = f.cx + side * (f.eye_dx + 0.22 * f.a)
        for dy in (-0.06, 0.0, 0.06):  # crow's feet
            _line(d, [(corner, f.eye_y + 0.3 * dy * f.b), (corner + side * 0.14 * f.a, f.eye_y + dy * f.b)],
                  pal.shade, w)
        x = f.cx + side * 0.2 * f.a  # nose-to-mouth folds
        _line(d, [(x, f.nose_y - 0.02 * f.b), (x + side * 0.14 * f.a, f.nose_y + 0.12 * f.b),
                  (f.cx + side * (f.mouth_w + 0.12 * f.a), f.mouth_y + 0.04 * f.b)], pal.shade, w)


def draw_eyes(d, f: Frame, attrs, pal: Palette, nz: Nuisance) -> None:
    rx, ry = 0.2 * f.a, 0.1 * f.b
    brow = dict(colour=(30, 22, 18), width=0.1 * f.b) if attrs["Bushy_Eyebrows"] else \
        dict(colour=pal.shade, width=0.03 * f.b)
    for side in (-1, 1):
        x = f.cx + side * f.eye_dx
        _ellipse(d, x, f.eye_y, rx, ry, fill=(245, 245, 240), outline=pal.shade, width=max(1, int(0.02 * f.b)))
        _ellipse(d, x, f.eye_y, 0.8 * ry, 0.8 * ry, fill=IRIS_RGB[nz.iris])
        _ellipse(d, x, f.eye_y, 0.4 * ry, 0.4 * ry, fill=(10, 10, 10))
        arch = [(x - side * 0.24 * f.a, f.brow_y + 0.03 * f.b), (x, f.brow_y - 0.02 * f.b),
                (x + side * 0.26 * f.a, f.brow_y + 0.04 * f.b)]
        _line(d, arch, brow["colour"], brow["width"])


def draw_glasses(d, f: Frame) -> None:
    w = max(1, int(round(0.075 * f.a)))
    rx, ry = 0.29 * f.a, 0.19 * f.b
    for side in (-1, 1):
        x = f.cx + side * f.eye_dx
        d.rounded_rectangle((x - rx, f.eye_y - ry, x + rx, f.eye_y + ry), radius=0.4 * ry, outline=FRAME_RGB, width=w)
        _line(d, [(x + side * rx, f.eye_y - 0.4 * ry), (f.cx + side * 0.98 * f.a, f.eye_y - 0.2 * ry)], FRAME_RGB, w)
    inner = f.eye_dx - rx
    _line(d, [(f.cx - inner, f.eye_y - 0.3 * ry), (f.cx, f.eye_y - 0.5 * ry), (f.cx + inner, f.eye_y - 0.3 * ry)],
          FRAME_RGB, w)


def draw_nose(d, f: Frame, pal: Palette) -> None:
    w = 0.035 * f.b
    _line(d, [(f.cx + 0.06 * f.a, f.eye_y + 0.12 * f.b), (f.cx + 0.12 * f.a, f.nose_y - 0.03 * f.b)], pal.shade, w)
    _line(d, [(f.cx - 0.13 * f.a, f.nose_y - 0.01 * f.b), (f.cx, f.nose_y + 0.04 * f.b),
              (f.cx + 0.13 * f.a, f.nose_y - 0.01 * f.b)], pal.shade, w)


def draw_beard(d, f: Frame, attrs, pal: Palette) -> None:
    outline = [p for p in head_outline(f, attrs["Male"], grow=1.01) if p[1] > f.cy + 0.05 * f.b]
    outline.sort(key=lambda p: math.atan2(p[1] - f.cy, p[0] - f.cx))  # right cheek, chin, left cheek
    m = f.mouth_w
    inner = [(f.cx - 0.72 * f.a, f.cy + 0.1 * f.b), (f.cx - m - 0.12 * f.a, f.mouth_y - 0.08 * f.b),
             (f.cx - m, f.mouth_y + 0.14 * f.b), (f.cx, f.mouth_y + 0.18 * f.b),
             (f.cx + m, f.mouth_y + 0.14 * f.b), (f.cx + m + 0.12 * f.a, f.mouth_y - 0.08 * f.b),
             (f.cx + 0.72 * f.a, f.cy + 0.1 * f.b)]
    d.polygon(outline + inner, fill=pal.facial_hair)


def mouth_corners(f: Frame, attrs) -> tuple[float, float]:
    """Half-width and corner height: a smile is wider with raised corners."""
    if attrs["Smiling"]:
        return 1.25 * f.mouth_w, f.mouth_y - 0.05 * f.b
    return f.mouth_w, f.mouth_y


def draw_mouth(d, f: Frame, attrs, pal: Palette) -> None:
    half, corner_y = mouth_corners(f, attrs)
    xs = np.linspace(-1, 1, 25)
    bulge = 1 - xs ** 2
    centre = corner_y + (0.13 if attrs["Smiling"] else 0.01) * f.b * bulge
    gap = (0.15 * f.b if attrs["Mouth_Slightly_Open"] else 0.0) * bulge
    lip = 1.3 if attrs["Wearing_Lipstick"] else 1.0
    upper_in, lower_in = centre - 0.35 * gap, centre + 0.65 * gap
    upper_out = upper_in - lip * 0.06 * f.b * np.sqrt(bulge)
    lower_out = lower_in + lip * 0.075 * f.b * np.sqrt(bulge)
    x = f.cx + half * xs
    d.polygon(list(zip(x, upper_out)) + list(zip(x[::-1], lower_out[::-1])), fill=pal.lips)
    if attrs["Mouth_Slightly_Open"]:
        d.polygon(list(zip(x, upper_in)) + list(zip(x[::-1], lower_in[::-1])), fill=MOUTH_INSIDE)
        if attrs["Smiling"]:
            teeth = upper_in + 0.4 * gap
            d.polygon(list(zip(x, upper_in)) + list(zip(x[::-1], teeth[::-1])), fill=TEETH)
    else:
        _line(d, list(zip(x, centre)), MOUTH_INSIDE, 0.025 * f.b)


def draw_mustache(d, f: Frame, pal: Palette) -> None:
    top, bottom = f.nose_y + 0.07 * f.b, f.mouth_y - 0.09 * f.b
    w = f.mouth_w
    right = [(f.cx + 0.08 * f.a, top), (f.cx + 0.6 * w, top + 0.02 * f.b), (f.cx + 1.2 * w, bottom + 0.1 * f.b),
             (f.cx + 1.05 * w, bottom + 0.12 * f.b), (f.cx + 0.5 * w, bottom), (f.cx, bottom - 0.02 * f.b)]
    left = [(2 * f.cx - x, y) for x, y in reversed(right)]
    d.polygon(right + left, fill=pal.facial_hair)


def draw_face(d, f: Frame, attrs, pal: Palette, nz: Nuisance) -> None:
    """Paint back to front; the order is what makes hair, beard and glasses overlap naturally."""
    draw_body(d, f, attrs, pal, nz)
    # A dark rim keeps the face apart from hair of a similar tone.
    d.polygon(head_outline(f, attrs["Male"]), fill=pal.skin, outline=_scale(pal.skin, 0.55),
              width=max(1, round(0.035 * f.a)))
    if not attrs["Young"]:
        draw_wrinkles(d, f, pal)
    draw_hair_top(d, f, attrs, pal)
    draw_eyes(d, f, attrs, pal, nz)
    draw_nose(d, f, pal)
    if not attrs["No_Beard"]:
        draw_beard(d, f, attrs, pal)
    draw_mouth(d, f, attrs, pal)
    if attrs["Mustache"]:
        draw_mustache(d, f, pal)
    if attrs["Eyeglasses"]:
        draw_glasses(d, f)


def landmarks(f: Frame, attrs, angle: float) -> np.ndarray:
    """The five CelebA points, rotated like the face layer (PIL rotates counter-clockwise)."""
    half, corner_y = mouth_corners(f, attrs)
    pts = np.array([(f.cx - f.eye_dx, f.eye_y), (f.cx + f.eye_dx, f.eye_y), (f.cx, f.nose_y),
                    (f.cx - half, corner_y), (f.cx + half, corner_y)])
    t = math.radians(angle)
    dx, dy = pts[:, 0] - f.cx, pts[:, 1] - f.cy
    return np.stack([f.cx + dx * math.cos(t) + dy * math.sin(t), f.cy - dx * math.sin(t) + dy * math.cos(t)], 1)


def background(nz: Nuisance, canvas: int) -> Image.Image:
    # A linear gradient survives bilinear upscaling exactly, so compute it small.
    ramp = np.linspace(-0.5, 0.5, 64, dtype=np.float32)
    t = np.clip(ramp[None, :] * math.cos(nz.bg_angle) + ramp[:, None] * math.sin(nz.bg_angle) + 0.5, 0, 1)
    colours = nz.bg_colours.astype(np.float32)
    rgb = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
    small = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return small.resize((canvas, canvas), Image.Resampling.BILINEAR)


def light_and_noise(img: Image.Image, nz: Nuisance) -> Image.Image:
    size = img.size[0]
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    along = ramp[None, :] * math.cos(nz.light_angle) + ramp[:, None] * math.sin(nz.light_angle)
    light = 1 + nz.light_strength * along
    arr = np.asarray(img, dtype=np.float32) * light[..., None] + nz.noise_sigma * nz.noise
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def supersampling(size: int) -> int:
    return max(2, min(4, 2048 // size))


def render_face(attrs: dict[str, bool], rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """Draw one face; returns the RGB image and (5, 2) landmarks in output pixel coordinates.

    Missing attributes count as off; conflicting ones are settled by `resolve_conflicts`.
    """
    for name in attrs:
        check_attribute(name)
    attrs = resolve_conflicts(attrs)
    nz = draw_nuisance(rng, size)
    factor = supersampling(size)
    canvas = size * factor
    frame = make_frame(nz, canvas)
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw_face(ImageDraw.Draw(layer), frame, attrs, make_palette(attrs, nz), nz)
    layer = layer.rotate(nz.angle, resample=Image.Resampling.BILINEAR, center=(frame.cx, frame.cy))
    img = background(nz, canvas)
    img.paste(layer, mask=layer)
    img = light_and_noise(img.resize((size, size), Image.Resampling.LANCZOS), nz)
    # Canvas pixel centres map to output as (p + 0.5) / factor - 0.5.
    points = (landmarks(frame, attrs, nz.angle) + 0.5) / factor - 0.5
    return img, points


# ----------------------------------------------------------------------------- indexed faces


def face_labels(seed: int, index: int, correlations=()) -> dict[str, bool]:
    """The labels of face `index` of a dataset drawn with `seed` (what `make_dataset` writes)."""
    return sample_attributes(np.random.default_rng([seed, index, 0]), correlations)


def render_index(attrs: dict[str, bool], seed: int, index: int, size: int) -> tuple[Image.Image, np.ndarray]:
    """Face `index` of a dataset drawn with `seed`, rendered with `attrs`.

    Labels and nuisance come from separate streams, so any `attrs` keep the nuisance of
    face `index`: with one attribute changed this is the same face with only that feature changed.
    """
    return render_face(attrs, np.random.default_rng([seed, index, 1]), size)
