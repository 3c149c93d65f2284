"""The AttGAN backbone: generator, discriminator and the wrapper the attack uses.

Module and parameter names follow the public PyTorch AttGAN checkpoints so their
`weights.<epoch>.pth` files load with `strict=True` (see shared/compat/README.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sia_cli.errors import SiaError

MAX_DIM = 1024


def _norm(kind: str, channels: int) -> nn.Module | None:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "instancenorm":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}")


def _activation(kind: str) -> nn.Module | None:
    table = {"relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.01), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if kind == "none":
        return None
    if kind not in table:
        raise ValueError(f"unknown activation {kind!r}")
    return table[kind]()


class Block(nn.Module):
    """A layer followed by its norm and activation, kept in `.layers` to match checkpoint keys."""

    def __init__(self, layer_cls, n_in: int, n_out: int, norm: str, acti: str, **kwargs):
        super().__init__()
        bias = norm == "none"  # a norm right after the layer makes its bias redundant
        parts = [layer_cls(n_in, n_out, bias=bias, **kwargs), _norm(norm, n_out), _activation(acti)]
        self.layers = nn.Sequential(*[p for p in parts if p is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def conv_block(n_in, n_out, norm, acti):
    return Block(nn.Conv2d, n_in, n_out, norm, acti, kernel_size=4, stride=2, padding=1)


def deconv_block(n_in, n_out, norm, acti):
    return Block(nn.ConvTranspose2d, n_in, n_out, norm, acti, kernel_size=4, stride=2, padding=1)


def linear_block(n_in, n_out, norm, acti):
    return Block(nn.Linear, n_in, n_out, norm, acti)


class Refine(nn.Module):
    """z + conv(relu(conv(z))), 3x3, through half the width (the shipped backbone's file stays
    under 5 MB). The second convolution starts at zero, so a block added to a trained generator
    leaves its images as they were until training moves it (examples/train_backbone.py
    --refine-layers)."""

    def __init__(self, channels: int):
        super().__init__()
        self.inner = nn.Conv2d(channels, channels // 2, 3, padding=1)
        self.outer = nn.Conv2d(channels // 2, channels, 3, padding=1)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.outer(torch.relu(self.inner(z)))


class Detail(nn.Module):
    """Ours: a pair of 3x3 convolutions at the image's own resolution that see the input image
    beside the decoder's image and the attributes, and add to the image layer's pre-activation.
    Every other map of the generator is at half the resolution or less, so without it fine
    detail the encoder saw is drawn again from coarse maps (the reconstruction's blur). The
    second convolution starts at zero: added to a trained generator it leaves its images as
    they were until training moves it (examples/train_backbone.py --detail-layers).

    Reading the input, the block also brings back what an edit takes away (a man's short hair
    grows back towards the input's long hair). With `gate` > 0 its addition is weighed per pixel
    by exp(-d / gate), d being how far the decoder's image lies from the input there (in [0, 1]
    units, the signed difference averaged over GATE_SIZE x GATE_SIZE pixels and its magnitude
    averaged over channels). Blur errors are fine and zero-mean and average away, so the
    reconstruction keeps its detail; an edit moves whole regions one way, and there the gate
    closes and the decoder's edit stands."""

    GATE_SIZE = 5

    def __init__(self, n_attrs: int, width: int = 32, gate: float = 0.0):
        super().__init__()
        self.inner = nn.Conv2d(3 + 3 + n_attrs, width, 3, padding=1)
        self.outer = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)
        self.gate = gate

    def forward(self, logits: torch.Tensor, image: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        drawn = torch.tanh(logits)
        seen = torch.cat([drawn, image, _tile(a, image.size(-1))], dim=1)
        added = self.outer(torch.relu(self.inner(seen)))
        if self.gate > 0:
            departure = F.avg_pool2d(drawn - image, self.GATE_SIZE, stride=1, padding=self.GATE_SIZE // 2,
                                     count_include_pad=False)
            # images are in [-1, 1]: half the difference is the difference in [0, 1]
            added = added * torch.exp(-departure.abs().mean(dim=1, keepdim=True) / (2 * self.gate))
        return logits + added


@dataclass
class GeneratorConfig:
    """Constructor settings of the generator, named as in a public `setting.txt`."""

    enc_dim: int = 64
    enc_layers: int = 5
    enc_norm: str = "batchnorm"
    enc_acti: str = "lrelu"
    dec_dim: int = 64
    dec_layers: int = 5
    dec_norm: str = "batchnorm"
    dec_acti: str = "relu"
    n_attrs: int = 13
    shortcut_layers: int = 1
    inject_layers: int = 1
    img_size: int = 128
    # Ours, not public AttGAN's (whose checkpoints have none): residual 3x3 blocks at the
    # decoder's last hidden resolution, where attributes, shortcut and decoder maps meet before
    # the image layer. Small features (a mouth opening: 4x2 pixels there) need more than the one
    # transposed convolution that turns those maps into the image.
    refine_layers: int = 0
    # Ours too: attgan.Detail blocks at the image's resolution, which see the input image.
    detail_layers: int = 0
    # Ours: in [0, 1] units, how far the decoder's image may depart from the input before the
    # detail blocks' addition fades there (attgan.Detail); 0 adds it everywhere.
    detail_gate: float = 0.0

    @classmethod
    def from_setting(cls, setting: dict) -> "GeneratorConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in setting.items() if k in known}
        if "attrs" in setting:
            values["n_attrs"] = len(setting["attrs"])
        return cls(**values)


@dataclass
class DiscriminatorConfig:
    dim: int = 64
    norm: str = "instancenorm"
    acti: str = "lrelu"
    fc_dim: int = 1024
    fc_norm: str = "none"
    fc_acti: str = "relu"
    layers: int = 5
    img_size: int = 128
    n_attrs: int = 13

    @classmethod
    def from_setting(cls, setting: dict) -> "DiscriminatorConfig":
        # setting.txt prefixes the discriminator's settings with `dis_`, except the shared ones.
        values = {f.name: setting[f"dis_{f.name}"] for f in fields(cls) if f"dis_{f.name}" in setting}
        if "img_size" in setting:
            values["img_size"] = setting["img_size"]
        if "attrs" in setting:
            values["n_attrs"] = len(setting["attrs"])
        return cls(**values)


def _tile(a: torch.Tensor, size: int) -> torch.Tensor:
    return a.view(a.size(0), -1, 1, 1).expand(-1, -1, size, size)


class Generator(nn.Module):
    """AttGAN generator: `decode(encode(x), a)` with attribute inputs already in checkpoint convention."""

    def __init__(self, config: GeneratorConfig | None = None, **kwargs):
        super().__init__()
        c = config or GeneratorConfig(**kwargs)
        self.config = c
        if c.shortcut_layers > c.dec_layers - 1 or c.inject_layers > c.dec_layers - 1:
            raise ValueError("shortcut_layers and inject_layers must be below dec_layers")
        enc_widths = [min(c.enc_dim * 2**i, MAX_DIM) for i in range(c.enc_layers)]
        self.enc_layers = nn.ModuleList()
        n_in = 3
        for width in enc_widths:
            self.enc_layers.append(conv_block(n_in, width, c.enc_norm, c.enc_acti))
            n_in = width
        self.dec_layers = nn.ModuleList()
        n_in = enc_widths[-1] + c.n_attrs
        for i in range(c.dec_layers - 1):
            width = min(c.dec_dim * 2 ** (c.dec_layers - i - 1), MAX_DIM)
            self.dec_layers.append(deconv_block(n_in, width, c.dec_norm, c.dec_acti))
            n_in = width
            if i < c.shortcut_layers:
                n_in += enc_widths[c.dec_layers - 2 - i]
            if i < c.inject_layers:
                n_in += c.n_attrs
        self.refine = nn.ModuleList(Refine(n_in) for _ in range(c.refine_layers))
        self.dec_layers.append(deconv_block(n_in, 3, "none", "tanh"))
        self.detail = nn.ModuleList(Detail(c.n_attrs, gate=c.detail_gate) for _ in range(c.detail_layers))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.enc_layers:
            x = layer(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor], a: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The image for attributes `a` from the encoder's `features`; detail blocks also read
        the encoded `image`."""
        c = self.config
        if self.detail and image is None:
            raise ValueError("a generator with detail layers decodes with the encoded image")
        z = features[-1]
        z = torch.cat([z, _tile(a, z.size(-1))], dim=1)
        for i, layer in enumerate(self.dec_layers):
            if i == len(self.dec_layers) - 1:
                for block in self.refine:
                    z = block(z)
                if self.detail:
                    return self._detailed(layer, z, image, a)
            z = layer(z)
            if i < c.shortcut_layers:
                z = torch.cat([z, features[c.dec_layers - 2 - i]], dim=1)
            if i < c.inject_layers:
                z = torch.cat([z, _tile(a, z.size(-1))], dim=1)
        return z

    def _detailed(self, layer: Block, z: torch.Tensor, image: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        transposed, activation = layer.layers  # the image layer's parts, keys kept for checkpoints
        logits = transposed(z)
        for block in self.detail:
            logits = block(logits, image, a)
        return activation(logits)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), a, x)


class Discriminator(nn.Module):
    """Critic with an adversarial head and an attribute-classification head (logits)."""

    def __init__(self, config: DiscriminatorConfig | None = None, **kwargs):
        super().__init__()
        c = config or DiscriminatorConfig(**kwargs)
        self.config = c
        self.conv = nn.ModuleList()
        n_in = 3
        for i in range(c.layers):
            width = min(c.dim * 2**i, MAX_DIM)
            self.conv.append(conv_block(n_in, width, c.norm, c.acti))
            n_in = width
        flat = n_in * (c.img_size // 2**c.layers) ** 2

        def head(n_out):
            return nn.Sequential(linear_block(flat, c.fc_dim, c.fc_norm, c.fc_acti), linear_block(c.fc_dim, n_out, "none", "none"))

        self.fc_adv = head(1)
        self.fc_cls = head(c.n_attrs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.conv:
            x = layer(x)
        h = x.flatten(1)
        return self.fc_adv(h), self.fc_cls(h)


@dataclass
class BackboneInfo:
    """What describes a set of weights, apart from the architecture (cf. a model card)."""

    name: str
    attributes: list[str]
    img_size: int
    thres_int: float = 0.5
    path: str = ""
    sha256: str = ""
    setting: dict = field(default_factory=dict)
    # What was measured about these weights (`card.json` beside setting.txt, or the registry
    # entry's `card:`): per-attribute edit success and the critic's domain calibration.
    card: dict = field(default_factory=dict)


class AttGAN(nn.Module):
    """The backbone as the attack sees it: images in [-1, 1], attributes in [0, 1].

    The public checkpoints were trained on attribute inputs `(a * 2 - 1) * thres_int`;
    the conversion lives here so every other module speaks [0, 1].
    """

    def __init__(self, generator: Generator, info: BackboneInfo, discriminator: Discriminator | None = None):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.info = info

    @property
    def attributes(self) -> list[str]:
        return self.info.attributes

    @property
    def img_size(self) -> int:
        return self.info.img_size

    def attribute_input(self, a01: torch.Tensor) -> torch.Tensor:
        return (a01 * 2 - 1) * self.info.thres_int

    def forward(self, x: torch.Tensor, a01: torch.Tensor) -> torch.Tensor:
        return self.generator(x, self.attribute_input(a01))

    def reconstruct(self, x: torch.Tensor, a01: torch.Tensor) -> torch.Tensor:
        return self.forward(x, a01)

    @torch.no_grad()
    def critic_scores(self, x: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per image: the critic's score of the image, and its margin over the reconstruction's score.

        The WGAN critic learned to score its training images above generated ones; on images
        like its training data the margin is wide and the score high. On images it has never
        seen the margin collapses while the generator is blurry, but a generator that
        reconstructs sharply shrinks the margin on everything, and then the score itself still
        falls far below its training faces' (measured in docs/backbone.md). None without a
        discriminator.
        """
        if self.discriminator is None:
            return None
        score = self.discriminator(x)[0].reshape(len(x)).float()
        return score, score - self.discriminator(reconstruction)[0].reshape(len(x)).float()

    @torch.no_grad()
    def predict_attributes(self, x: torch.Tensor) -> torch.Tensor:
        """Attribute probabilities from the discriminator's classification head."""
        if self.discriminator is None:
            raise RuntimeError("backbone has no discriminator")
        return torch.sigmoid(self.discriminator(x)[1])

    def freeze(self) -> "AttGAN":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


# --- checkpoints -------------------------------------------------------------------------

SETTING_FILE = "setting.txt"
CARD_FILE = "card.json"


def checkpoint_number(path) -> int:
    """`weights.<n>.pth` -> n, so the newest of several checkpoints can be picked."""
    try:
        return int(path.name.split(".")[-2])
    except (ValueError, IndexError):
        return -1


def latest_checkpoint(directory) -> Path | None:
    directory = Path(directory)
    found = [p for d in (directory / "checkpoint", directory) if d.is_dir() for p in d.glob("weights.*.pth")]
    return max(found, key=checkpoint_number) if found else None


def read_checkpoint(path) -> dict:
    """Load a checkpoint dict with `weights_only=True`: tensors and plain data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SiaError(f"backbone checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for damaged zip/pickle data
        raise SiaError(
            f"cannot read backbone checkpoint {path} (corrupted or not a checkpoint): {_load_failure(exc)}"
        ) from None
    if not isinstance(state, dict) or "G" not in state:
        raise SiaError(f"{path} is not an AttGAN checkpoint: expected a dict with key 'G'")
    return state


def _load_failure(exc: Exception) -> str:
    """The informative sentence of a torch.load error. Its weights-only notice advises reloading
    with weights_only=False (running code from the file), which never repairs a damaged file."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    paragraph = next((p for p in text.split("\n\n") if p.strip()), "")
    return " ".join(paragraph.split()).split(". ")[0] or type(exc).__name__


def _trained_attribute_count(generator: dict) -> int | None:
    """How many attributes the checkpoint's generator takes: its first decoder layer reads the
    encoder's last features plus the tiled attributes. None when the keys are not AttGAN's."""
    encoders = [k for k in generator if re.fullmatch(r"enc_layers\.\d+\.layers\.0\.weight", k)]
    first_decoder = generator.get("dec_layers.0.layers.0.weight")
    if not encoders or not isinstance(first_decoder, torch.Tensor):
        return None
    last_encoder = generator[max(encoders, key=lambda k: int(k.split(".")[1]))]
    return int(first_decoder.shape[0] - last_encoder.shape[0])


def build_backbone(state: dict, setting: dict, name: str = "", path: str = "", sha256: str = "",
                   card: dict | None = None) -> AttGAN:
    """Build generator (and discriminator when the checkpoint has one) and load them strictly."""
    attributes = list(setting.get("attrs", []))
    if not attributes:
        raise SiaError(f"backbone setting for {name or path} lists no attributes ('attrs')")
    trained = _trained_attribute_count(state["G"]) if isinstance(state["G"], dict) else None
    if trained is not None and trained != len(attributes):
        # Said plainly before the strict load, whose size-mismatch list runs over many lines.
        raise SiaError(
            f"backbone {name or path}: its settings list {len(attributes)} attributes "
            f"but checkpoint {path} was trained with {trained}: settings and weights do not match"
        )
    try:
        generator = Generator(GeneratorConfig.from_setting(setting))
        discriminator = Discriminator(DiscriminatorConfig.from_setting(setting)) if "D" in state else None
    except (TypeError, ValueError) as exc:  # impossible or mistyped values in setting.txt / weights.yaml
        raise SiaError(f"backbone setting for {name or path} describes no valid AttGAN: {exc}") from None
    _load_strict(generator, state["G"], "generator", setting, path)
    if discriminator is not None:
        _load_strict(discriminator, state["D"], "discriminator", setting, path)
    info = BackboneInfo(
        name=name or path,
        attributes=attributes,
        img_size=int(setting.get("img_size", 128)),
        thres_int=float(setting.get("thres_int", 0.5)),
        path=path,
        sha256=sha256,
        setting=setting,
        card=dict(card or {}),
    )
    return AttGAN(generator, info, discriminator).freeze()


def _load_strict(module: nn.Module, weights: dict, what: str, setting: dict, path: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise SiaError(
            f"{what} weights in {path} do not match its settings "
            f"({len(setting.get('attrs', []))} attributes, img_size {setting.get('img_size')}): {detail}"
        ) from None


# ----------------------------------------------------------------------------- editing one attribute


HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")


def exclusive_with(name: str) -> tuple[str, ...]:
    """The attributes no training face has on together with `name`: one hair colour at a time, and
    Bald and Bangs not together (CelebA's and the renderer's convention; the public AttGAN code
    turns them off when it turns an attribute on)."""
    if name in HAIR_COLOURS:
        return tuple(other for other in HAIR_COLOURS if other != name)
    return {"Bald": ("Bangs",), "Bangs": ("Bald",)}.get(name, ())


def edited(a: torch.Tensor, k: int, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` with attribute k flipped, and where that turns it on, the attributes exclusive with it
    turned off (asking for black and blond hair at once asks for a face no training set holds).
    Returns the edited attributes and a mask of the ones turned off that way."""
    flipped = a.clone()
    flipped[:, k] = 1 - flipped[:, k]
    implied = torch.zeros_like(a, dtype=torch.bool)
    turned_on = flipped[:, k] > 0.5
    for other in exclusive_with(names[k]):
        if other in names:
            j = list(names).index(other)
            implied[:, j] = turned_on & (a[:, j] > 0.5)
            flipped[implied[:, j], j] = 0
    return flipped, implied
