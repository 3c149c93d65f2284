"""Scale-out through the real `torchrun` launcher: 2 CPU processes on the gloo backend.

A sharded run must write what one process writes on the same inputs and seed. Fields that
describe where and how the run went may differ, and only those: the command line and `--out`,
the device (thread count), `world_size` and the timing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sia_cli.backbone.attgan import latest_checkpoint, read_checkpoint
from sia_cli.inputs.synth import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO = Path(__file__).resolve().parents[1]
MUSTACHE = REPO / "examples" / "targets" / "mustache_confounded.pt"
N_FACES = 7  # with --batch-size 2: blocks of 2, 2, 2, 1 -> rank 0 takes two, rank 1 two
RUN_FIELDS = {"command", "device", "world_size", "timing"}  # where and how, not what


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def sia(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sia_cli", *map(str, args)], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=600)


def torchrun(*args, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([*launcher, "-m", "sia_cli", *map(str, args)], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_dataset(root, N_FACES, seed=21)
    (root / "images" / "000003.png").write_bytes(b"not a png")  # every rank must agree it is skipped
    return root


def common(faces: Path, steps: int = 4) -> list[str]:
    return ["--images", faces / "images", "--attrs-file", faces / "list_attr.txt", "--protect", "Mustache",
            "--steps", steps, "--batch-size", 2, "--no-progress"]


def same_report(one: dict, two: dict) -> None:
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["complete"] is True
    differing = {k for k in set(one) | set(two) if one.get(k) != two.get(k)}
    assert differing <= RUN_FIELDS | {"settings"}, differing
    settings_one, settings_two = dict(one["settings"]), dict(two["settings"])
    assert settings_one.pop("out") != settings_two.pop("out")
    settings_one.pop("command"), settings_two.pop("command")
    assert settings_one == settings_two


def same_files(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names and names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def no_run_state_left(out: Path) -> None:
    assert not list(out.glob(".sia-progress.*")) and not (out / ".sia-run.json").exists()


def test_diagnose_two_processes_write_the_single_process_report(faces, tmp_path):
    ok(sia("diagnose", MUSTACHE, *common(faces), "--out", tmp_path / "one", cwd=tmp_path))
    two = ok(torchrun("diagnose", MUSTACHE, *common(faces), "--out", tmp_path / "two", cwd=tmp_path))
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    same_report(report_one, report_two)
    assert [r["file"] for r in report_two["images"]] == ["000000.png", "000001.png", "000002.png",
                                                         "000004.png", "000005.png", "000006.png"]
    assert [s["file"] for s in report_two["skipped"]] == ["000003.png"]
    same_files(tmp_path / "one" / "adversaries", tmp_path / "two" / "adversaries")
    no_run_state_left(tmp_path / "two")
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints the summary


def test_attack_two_methods_two_processes(faces, tmp_path):
    args = ["attack", MUSTACHE, *common(faces), "--method", "sia,pgd"]
    ok(sia(*args, "--out", tmp_path / "one", cwd=tmp_path))
    ok(torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path))
    for method in ("sia", "pgd"):
        report_one = json.loads((tmp_path / "one" / method / "report.json").read_text())
        report_two = json.loads((tmp_path / "two" / method / "report.json").read_text())
        same_report(report_one, report_two)
        same_files(tmp_path / "one" / method / "adversaries", tmp_path / "two" / method / "adversaries")
    comparison = json.loads((tmp_path / "two" / "comparison.json").read_text())
    assert comparison == json.loads((tmp_path / "one" / "comparison.json").read_text())
    no_run_state_left(tmp_path / "two")


def test_augment_two_processes_write_the_same_set(faces, tmp_path):
    args = ["augment", MUSTACHE, *common(faces), "--count", 9]  # torchrun reads --n as its own option
    ok(sia(*args, "--out", tmp_path / "one", cwd=tmp_path))
    ok(torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path))
    for table in ("list_attr.txt", "labels.csv"):
        assert (tmp_path / "one" / table).read_text() == (tmp_path / "two" / table).read_text(), table
    assert len((tmp_path / "two" / "labels.csv").read_text().splitlines()) == 1 + 9
    same_files(tmp_path / "one" / "images", tmp_path / "two" / "images")
    manifest_one = json.loads((tmp_path / "one" / "augment.json").read_text())
    manifest_two = json.loads((tmp_path / "two" / "augment.json").read_text())
    assert manifest_two["complete"] and manifest_two["summary"]["done"] == 9
    assert manifest_one["summary"] | {"out": ""} == manifest_two["summary"] | {"out": ""}
    assert manifest_one["images"] == manifest_two["images"]  # every image's row, whichever rank made it
    no_run_state_left(tmp_path / "two")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_diagnose_on_two_nodes(faces, tmp_path):
    """Two torchrun launchers of one process each, rendezvousing over loopback as two nodes would."""
    port = free_port()
    args = ["diagnose", MUSTACHE, *common(faces, steps=2), "--out", tmp_path / "nodes"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "sia_cli", *map(str, args)],
            cwd=tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    ok(sia(*args[:-1], tmp_path / "single", cwd=tmp_path))
    same_report(json.loads((tmp_path / "single" / "report.json").read_text()),
                json.loads((tmp_path / "nodes" / "report.json").read_text()))


def train_args(faces: Path, out: Path, steps: int) -> list:
    return ["train-gan", "--images", faces / "images", "--attrs", faces / "list_attr.txt", "--out", out,
            "--img-size", 32, "--batch-size", 2, "--n-d", 1, "--enc-dim", 8, "--dec-dim", 8, "--dis-dim", 8,
            "--dis-fc-dim", 16, "--layers", 3, "--max-steps", steps, "--save-every", 2, "--no-progress"]


@pytest.fixture(scope="module")
def clean_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_faces")
    make_dataset(root, 8, seed=22)
    return root


def test_train_gan_ddp_and_resume_across_world_sizes(clean_faces, tmp_path):
    out = tmp_path / "gan"
    first = ok(torchrun(*train_args(clean_faces, out, 2), cwd=tmp_path))
    assert first.stdout.count("trained to step 2") == 1
    two = read_checkpoint(latest_checkpoint(out))
    assert two["sia"]["step"] == 2
    ok(sia(*train_args(clean_faces, out, 4), cwd=tmp_path))  # 2 processes -> 1
    ok(torchrun(*train_args(clean_faces, out, 6), cwd=tmp_path))  # 1 -> 2
    six = read_checkpoint(latest_checkpoint(out))
    assert six["sia"]["step"] == 6
    moved = [name for name, value in six["G"].items() if not torch.equal(value, two["G"][name])]
    assert moved, "resumed training changed no generator weight"
    assert not list((out / "checkpoint").glob("*.tmp"))


def test_ddp_keeps_every_rank_on_the_same_weights(clean_faces, tmp_path):
    """Ranks train on different images; without gradient averaging their weights would part."""
    script = Path(__file__).with_name("ddp_weights.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = ok(subprocess.run([*launcher, script, clean_faces, tmp_path / "gan"], cwd=tmp_path,
                               env=environment(), capture_output=True, text=True, timeout=600))
    digests = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(digests["after"]) == 2 and digests["after"][0] == digests["after"][1]
    assert digests["after"][0] != digests["before"][0]  # it did train
    assert digests["unsynced"][0] != digests["unsynced"][1]  # the check can tell ranks apart


def test_harden_two_processes_train_the_one_process_model(faces, tmp_path):
    """Each rank attacks and trains on its slice of every batch and the gradients are summed: the
    hardened weights equal one process's up to float noise."""
    args = ["harden", MUSTACHE, *common(faces, steps=2), "--step-size", "0.05", "--epochs", 2, "--batch-size", 4,
            "--lr", "1e-3"]
    ok(sia(*args, "--out", tmp_path / "one", cwd=tmp_path))
    ok(torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path))
    one = torch.jit.load(tmp_path / "one" / "model.pt").state_dict()
    two = torch.jit.load(tmp_path / "two" / "model.pt").state_dict()
    original = torch.jit.load(MUSTACHE).state_dict()
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[k], original[k]) for k in one)  # it trained
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one), \
        max(float((one[k] - two[k]).abs().max()) for k in one)
    training_one = json.loads((tmp_path / "one" / "training.json").read_text())
    training_two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert training_one["steps"] == training_two["steps"] == 4  # 6 usable faces, batches of 4, 2 epochs
    assert training_two["losses"] == pytest.approx(training_one["losses"], abs=1e-4)
    no_run_state_left(tmp_path / "two")
