"""Run under torchrun by tests/test_distributed.py: do ranks that train on different images
end with the same weights? Prints one JSON line (rank 0): the weight digests of every rank
before training, after DDP steps, and after one more step taken without DDP."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from sia_cli.backbone.batches import draw, memory_batches
from sia_cli.backbone.training import TrainConfig, Trainer, prepare
from sia_cli.runs.distributed import all_gather, join


def digest(trainer: Trainer) -> str:
    hasher = hashlib.sha256()
    for module in (trainer.generator, trainer.critic):
        for value in module.parameters():  # not buffers: BatchNorm statistics are each rank's own
            hasher.update(value.detach().cpu().numpy().tobytes())
    return hasher.hexdigest()


def step(trainer: Trainer, batches) -> None:
    trainer.critic_step(*draw(batches, trainer.device))
    trainer.generator_step(*draw(batches, trainer.device))


def main(faces: Path, out: Path) -> None:
    world, device = join("cpu")
    config = TrainConfig(images=faces / "images", attrs_file=faces / "list_attr.txt", attributes=["Bangs", "Eyeglasses", "Smiling"], out=out,
                         img_size=32, batch_size=2, enc_dim=8, dec_dim=8, dis_dim=8, dis_fc_dim=16,
                         enc_layers=3, dec_layers=3, dis_layers=3, n_d=1, device=device)
    dataset, setting = prepare(config, world)
    torch.manual_seed(world.rank)  # ranks start apart: DDP must bring them together
    trainer = Trainer(config, setting, world)
    before = all_gather(digest(trainer), world)
    batches = memory_batches(dataset, config.batch_size, trainer.device, world, seed=0)
    for _ in range(3):
        step(trainer, batches)
    after = all_gather(digest(trainer), world)
    trainer.edits, trainer.scorer = trainer.edits.module, trainer.scorer.module  # no gradient averaging
    step(trainer, batches)
    unsynced = all_gather(digest(trainer), world)
    if world.main:
        print(json.dumps({"before": before, "after": after, "unsynced": unsynced}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
