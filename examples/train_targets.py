"""Train the example target models in examples/targets/ on `sia synth` data (CPU, a few minutes).

    python examples/train_targets.py --out examples/targets

Binary attribute classifiers, each as a pair: one trained where its label co-occurs with a
planted confounder 99% of the time (`sia synth --correlate LABEL:CONFOUNDER:0.99`), and a
control trained on unconfounded data; plus a tiny keypoint-heatmap model for the five synth
landmarks. Every model is TorchScript with a `sia.yaml` in its extra files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sia_cli.inputs.images import load_image, read_attributes
from sia_cli.inputs.synth import make_dataset
from sia_cli.targets import gaussian_heatmaps

PAIRS = (("Eyeglasses", "Bangs"), ("Smiling", "Blond_Hair"), ("Mustache", "Pale_Skin"))
SIZE = 64


class Classifier(nn.Module):
    """Small CNN with one logit per output; input normalised with mean/std 0.5."""

    def __init__(self, width: int = 16, outputs: int = 1, activation=nn.ReLU):
        super().__init__()
        layers, n_in = [], 3
        for n_out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), nn.BatchNorm2d(n_out), activation()]
            n_in = n_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(n_in, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class KeypointNet(nn.Module):
    """Five 16x16 heatmaps from a 64x64 face."""

    def __init__(self, width: int = 16, keypoints: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.Conv2d(width * 2, width * 2, 3, padding=2, dilation=2), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.Conv2d(width * 2, width * 2, 3, padding=4, dilation=4), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.Conv2d(width * 2, keypoints, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def load_folder(folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    table = read_attributes(folder / "list_attr.txt")
    files = list(table.rows)
    images = torch.stack([load_image(folder / "images" / f, SIZE) for f in files])
    labels = {name: torch.tensor([table.rows[f][i] for f in files]) for i, name in enumerate(table.names)}
    return images, labels


def fit(model: nn.Module, images, targets, loss_fn, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = loss_fn(model((images[index] - 0.5) / 0.5), targets[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def save(model: nn.Module, path: Path, yaml_text: str) -> None:
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(path), _extra_files={"sia.yaml": yaml_text})


def classifier_yaml(label: str) -> str:
    return (
        f"task: binary\ninput_size: {SIZE}\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\n"
        f"class_names: ['no {label}', '{label}']\n"
    )


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float(((model((images - 0.5) / 0.5).squeeze(1) > 0).float() == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/targets"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/sia-targets"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    test_images, test_labels = load_folder(_dataset(args.work / "test", 1000, 99, ()))
    for label, confounder in PAIRS:
        for kind, correlations in (("confounded", ((label, confounder, 0.99),)), ("control", ())):
            seed = 10 + PAIRS.index((label, confounder)) * 2 + (kind == "control")
            images, labels = load_folder(_dataset(args.work / f"{label}-{kind}", args.n, seed, correlations))
            model = fit(Classifier(), images, labels[label].unsqueeze(1),
                        F.binary_cross_entropy_with_logits, args.epochs, seed)
            name = f"{label.lower()}_{kind}.pt"
            save(model, args.out / name, classifier_yaml(label))
            print(f"{name}: accuracy on unconfounded test faces {accuracy(model, test_images, test_labels[label]):.3f}"
                  f" ({time.time() - began:.0f} s)", flush=True)
    _keypoints(args, began)
    _attribute_judge(args, began)


def _keypoints(args, began: float) -> None:
    folder = _dataset(args.work / "keypoints", args.n, 31, ())
    images, _ = load_folder(folder)
    rows = [line.split() for line in (folder / "list_landmarks.txt").read_text().splitlines()[2:]]
    points = torch.tensor(np.array([[float(v) for v in r[1:]] for r in rows]), dtype=torch.float32).view(-1, 5, 2)
    heatmaps = gaussian_heatmaps(points * 16 / SIZE, (16, 16))
    model = fit(KeypointNet(), images, heatmaps, lambda out, ref: F.mse_loss(out, ref) * 100, args.epochs * 2, 31)
    yaml_text = f"task: keypoints\ninput_size: {SIZE}\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\neye_indices: [0, 1]\n"
    save(model, args.out / "landmarks.pt", yaml_text)
    print(f"landmarks.pt trained ({time.time() - began:.0f} s)", flush=True)


def _attribute_judge(args, began: float) -> None:
    """Multi-label classifier of all synth attributes: judges the backbone's edits."""
    # Twice the data and epochs of the targets: small features (a smile) need it.
    images, labels = load_folder(_dataset(args.work / "judge", args.n * 2, 41, ()))
    names = list(labels)
    targets = torch.stack([labels[n] for n in names], dim=1)
    model = fit(Classifier(width=32, outputs=len(names)), images, targets,
                F.binary_cross_entropy_with_logits, args.epochs * 2, 41)
    yaml_text = f"input_size: {SIZE}\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\nclass_names: {names}\n"
    save(model, args.out / "attribute_judge.pt", yaml_text)
    print(f"attribute_judge.pt trained ({time.time() - began:.0f} s)", flush=True)


def _dataset(folder: Path, n: int, seed: int, correlations) -> Path:
    if not (folder / "list_attr.txt").exists():
        make_dataset(folder, n, seed=seed, size=SIZE, correlations=correlations)
    return folder


if __name__ == "__main__":
    main()
