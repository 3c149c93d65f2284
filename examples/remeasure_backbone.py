"""Measure again every published figure that depends on the default backbone, with a candidate
in its place (docs/backbone.md, "Becoming the default"):

    python examples/remeasure_backbone.py /tmp/candidate --out /tmp/remeasure

A registry file named by $SIA_WEIGHTS maps `synth-faces-64` to the candidate's folder, so every
command below, the ones without a --gan option too, runs it as the default would be run. The
candidate's card is written first, into its own folder (`card.json`: the domain calibration that
backbone fit reads, and the edit success that names blind spots). Each job writes OUT/NAME.log
and, when it ends well, OUT/NAME.done with its seconds; run again after an interruption and the
finished jobs are skipped. `--only` runs some of them. Jobs run in order of cost, about two
and a half hours in all on this project's 2 cores (by the timings the docs give); nice it and let it run in the background.

What each job feeds is in JOBS. Not here: the one-step table of docs/validity.md (its photos are
put together by hand, as that page says) and the training history.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sia_cli.backbone.registry import BUILTIN_REGISTRY

ROOT = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)
SIA = f"{PY} -m sia_cli"
DEMO = ("diagnose {root}/examples/targets/{model}.pt --images {faces}/images --attrs-file {faces}/list_attr.txt "
        "--protect Mustache --steps 100 --no-progress --force --out {out}")


def _demo(faces: str, n: int) -> str:
    steps = [f"{SIA} synth {faces} --n {n} --seed 5 --no-progress"]
    for model, out in (("mustache_confounded", f"{faces}-demo"), ("mustache_control", f"{faces}-control")):
        steps.append(f"{SIA} " + DEMO.format(root=ROOT, model=model, faces=faces, out=out))
    steps.append(f"{SIA} sdar {faces}-demo/report.json --baseline {faces}-control/report.json")
    return " && ".join(steps)


# name: (command run in OUT, the figures it feeds)
JOBS: dict[str, tuple[str, str]] = {
    "card": (f"{PY} {ROOT}/examples/measure_backbone.py --n 300 --seed 77 --write-card {{backbone}}/card.json",
             "the card: README's edit-success table, docs/backbone.md's card"),
    "curve": (f"{PY} {ROOT}/examples/measure_backbone.py --n 150 --seed 4242",
              "docs/backbone.md: the training curve's last row"),
    "demo24": (_demo("faces", 24), "README demo, its control and their SDAR; docs/demo_sensitivity.png"),
    "demo96": (_demo("faces96", 96), "README: the demo on 96 faces, its control and their paired SDAR"),
    "methods": (f"{SIA} synth faces16 --n 16 --seed 11 --no-progress && {SIA} attack "
                f"{ROOT}/examples/targets/eyeglasses_confounded.pt --images faces16/images --attrs-file "
                f"faces16/list_attr.txt --protect Eyeglasses --method sia,attr,image,pgd,fgsm,spt --out compare "
                "--no-progress --force", "docs/methods.md, README's method sentence"),
    "bias": (f"{PY} {ROOT}/examples/measure_bias.py --n 24 --steps 100 --single-steps 20", "docs/validity.md: planted biases"),
    "fit": (f"{PY} {ROOT}/examples/measure_fit.py", "docs/validity.md: backbone fit"),
    "alignment": (f"{PY} {ROOT}/examples/measure_alignment.py", "docs/alignment.md: fit of aligned photos"),
    "imbalance": (f"{PY} {ROOT}/examples/imbalance_study.py --work imbalance", "docs/hardening.md: class imbalance"),
    "hardening": (f"{PY} {ROOT}/examples/measure_hardening.py --archs mlp cnn --work hardening",
                  "docs/hardening.md: planted confounders"),
    "validity": (f"{PY} {ROOT}/examples/measure_validity.py --threads 2 --work validity",
                 "docs/validity.md: validity against the truth; README's validity sentences"),
    "tests": (f"{PY} -m pytest -q -s {ROOT}/tests/test_validity.py {ROOT}/tests/test_diagnosis.py "
              f"{ROOT}/tests/test_trust.py {ROOT}/tests/test_explain.py {ROOT}/tests/test_example_backbone.py",
              "the figures docs quote from test runs (the Mustache model's cosine, the corner model)"),
    "walkthrough": (f"bash {ROOT}/examples/hardening_walkthrough.sh", "docs/hardening.md: the walkthrough"),
    "explanations": (f"{PY} {ROOT}/examples/measure_hardening.py --archs cnn --variants PGD-Adv SIA-Adv ART "
                     "--explanations --work explanations", "docs/explanations.md: Table 1's shape"),
    "softplus": (f"{PY} {ROOT}/examples/measure_hardening.py --archs cnn-softplus --variants PGD-Adv SIA-Adv ART "
                 "'ART, clean loss kept' --explanations --threads 2 --work softplus",
                 "docs/explanations.md: the softplus network"),
}


def registry(backbone: Path, out: Path) -> Path:
    """A registry file whose `synth-faces-64` is the built-in entry with its source moved to the
    candidate: the candidate's own setting.txt gives its architecture (it wins over an entry's)."""
    entry = yaml.safe_load(BUILTIN_REGISTRY.read_text())["synth-faces-64"]
    entry = {**{k: v for k, v in entry.items() if k != "arch"}, "description": f"candidate from {backbone}",
             "source": {"path": str(backbone.resolve())}}
    path = out / "weights.yaml"
    path.write_text(yaml.safe_dump({"synth-faces-64": entry}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", type=Path, help="the candidate's folder (setting.txt, checkpoint/)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sia-remeasure"))
    parser.add_argument("--only", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--dry-run", action="store_true", help="print the jobs' commands, run nothing")
    args = parser.parse_args()
    if not (args.backbone / "setting.txt").is_file():
        raise SystemExit(f"{args.backbone}: no setting.txt, not a backbone folder")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SIA_WEIGHTS": str(registry(args.backbone, args.out)), "PYTHONPATH": str(ROOT),
           "PYTHON": sys.executable}
    for name in args.only:
        command, feeds = JOBS[name]
        command = command.format(backbone=shlex.quote(str(args.backbone.resolve())))
        if args.dry_run:
            print(f"{name}: {command}")
            continue
        done = args.out / f"{name}.done"
        if done.is_file():
            print(f"{name}: done before ({done.read_text().strip()} s)", flush=True)
            continue
        began = time.perf_counter()
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.call(command, shell=True, cwd=args.out, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - began
        if code == 0:
            done.write_text(f"{seconds:.0f}\n")
        print(f"{name}: exit {code} in {seconds:.0f} s -> {args.out / (name + '.log')} ({feeds})", flush=True)


if __name__ == "__main__":
    main()
