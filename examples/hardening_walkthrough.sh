#!/usr/bin/env bash
# The hardening walkthrough of docs/hardening.md, run in the current folder: the same commands,
# then the true effect of every attribute on the model before and after (128 faces re-rendered,
# seed 9402). PYTHON names the interpreter that has sia installed (default: python3).
set -euo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=$ROOT/examples/targets/mustache_confounded.pt
sia() { "$PY" -m sia_cli "$@"; }
sia synth train --n 256 --seed 30 --correlate Mustache:Pale_Skin:0.99 --no-progress
sia synth held_out --n 64 --seed 31 --no-progress
for d in train held_out; do
  awk 'NR==2 {for (i = 1; i <= NF; i++) if ($i == "Mustache") c = i + 1; print "file,label"} NR>2 {print $1 "," ($c > 0)}' \
      $d/list_attr.txt > $d/labels.csv
done
sia diagnose "$MODEL" --images held_out/images --attrs-file held_out/list_attr.txt \
    --protect Mustache --steps 100 --out before --force --no-progress
sia harden "$MODEL" --images train/images --attrs-file train/list_attr.txt \
    --labels train/labels.csv --protect Mustache --steps 10 --step-size 0.05 --epochs 6 --lr 1e-3 \
    --eval-images held_out/images --eval-attrs-file held_out/list_attr.txt --eval-labels held_out/labels.csv \
    --eval-steps 20 --out hardened --force --no-progress
sia diagnose hardened/model.pt --images held_out/images --attrs-file held_out/list_attr.txt \
    --protect Mustache --steps 100 --out after --force --no-progress
"$PY" - "$MODEL" hardened/model.pt <<'PYTHON'
import sys
from sia_cli.measures.validity import counterfactual_bank, true_effects
from sia_cli.targets import load_target
bank = counterfactual_bank(9402, 128)
for path in sys.argv[1:]:
    effects = true_effects(load_target(path), 9402, 128, bank=bank)
    print(path, "true effects:", ", ".join(f"{k} {v:.3f}" for k, v in sorted(effects.items(), key=lambda kv: -kv[1])))
PYTHON
