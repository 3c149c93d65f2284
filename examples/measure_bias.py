"""Measure planted-bias recovery of each sensitivity measure (the README's table).

    python examples/measure_bias.py --n 48 --steps 100 --single-steps 40

For each planted pair (label, confounder) and each shipped model (confounded, control),
runs `sia diagnose` in multi mode (Eq. 2, flip and ablation) and single mode on fresh synth faces
and prints the confounder's rank and normalised share under every measure.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sia_cli.engine.attack import AttackSettings
from sia_cli.inputs.synth import make_dataset
from sia_cli.jobs.diagnose import DiagnoseConfig, diagnose
from sia_cli.measures.table import TABLE

TARGETS = Path(__file__).parent / "targets"
PAIRS = (("Eyeglasses", "Bangs"), ("Smiling", "Blond_Hair"), ("Mustache", "Pale_Skin"))


def rank_and_share(report: dict, key: str, confounder: str) -> str:
    shares = report[key]
    order = sorted(shares, key=lambda n: (-shares[n], n))
    return f"{order.index(confounder) + 1} / {shares[confounder]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--single-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        faces = Path(tmp) / "faces"
        make_dataset(faces, args.n, seed=args.seed, size=64)
        for label, confounder in PAIRS:
            found = {}
            for kind in ("confounded", "control"):
                for mode, steps in (("multi", args.steps), ("single", args.single_steps)):
                    config = DiagnoseConfig(
                        model=TARGETS / f"{label.lower()}_{kind}.pt", images=faces / "images",
                        attrs_file=faces / "list_attr.txt", out=Path(tmp) / f"{label}-{kind}-{mode}",
                        protect=(label,), settings=AttackSettings(steps=steps), mode=mode, bootstrap=0,
                    )
                    found[kind, mode] = diagnose(config)
            for measure in TABLE:  # each read from the mode it ranks in (Eq. 2: multi)
                key = measure.normalized_key
                rows.append((measure.label, f"{label} / {confounder}",
                             rank_and_share(found["confounded", measure.ranks_in], key, confounder),
                             rank_and_share(found["control", measure.ranks_in], key, confounder)))
            rows.append(("SDAR (Eq. 2)", f"{label} / {confounder}",
                         f"{found['confounded', 'multi']['sdar']:.4f}", f"{found['control', 'multi']['sdar']:.4f}"))
    print("| measure | label / planted confounder | confounded model: rank / share | control model: rank / share |")
    print("| --- | --- | --- | --- |")
    for row in sorted(rows, key=lambda r: (r[0], r[1])):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
