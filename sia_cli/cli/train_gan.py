"""`sia train-gan`: train an AttGAN backbone on a CelebA-layout folder."""

from pathlib import Path

import typer

from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, main_process, progress_enabled, rich_progress
from sia_cli.devices import pick_device
from sia_cli.training import TrainConfig, train_gan as run_training


@handle_errors
def train_gan(
    images: Path = typer.Option(..., "--images", help="Folder of training images."),
    attrs: Path = typer.Option(..., "--attrs", help="CelebA list_attr file for those images."),
    out: Path = typer.Option(..., "--out", help="Experiment folder: setting.txt, checkpoint/, sample_training/."),
    attributes: str = typer.Option("", "--attributes", help="Comma-separated attribute names (default: all in --attrs)."),
    img_size: int = typer.Option(64, help="Images are centre-cropped and resized to this size."),
    batch_size: int = typer.Option(32, help="Images per batch (per process under torchrun)."),
    max_steps: int = typer.Option(10000, help="Generator steps to train to (each after --n-d critic steps)."),
    n_d: int = typer.Option(5, help="Critic steps per generator step."),
    enc_dim: int = typer.Option(16, help="Encoder width of the first layer (doubles per layer, max 1024)."),
    dec_dim: int = typer.Option(16, help="Decoder width of the last hidden layer."),
    layers: int = typer.Option(4, help="Encoder, decoder and critic depth (stride-2 layers)."),
    dis_dim: int = typer.Option(16, help="Critic width of the first layer."),
    dis_fc_dim: int = typer.Option(64, help="Width of the critic's fully connected heads."),
    shortcut_layers: int = typer.Option(1, help="Encoder maps concatenated into the decoder."),
    inject_layers: int = typer.Option(1, help="Decoder layers that receive the attributes again."),
    lr: float = typer.Option(2e-4, help="Adam learning rate (betas 0.5, 0.999)."),
    sample_every: int = typer.Option(500, help="Write a sample grid every N steps."),
    save_every: int = typer.Option(1000, help="Write a checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    seed: int = typer.Option(0, help="Random seed."),
    workers: int = typer.Option(0, help="Data-loading worker processes."),
    preload: bool = typer.Option(False, "--preload", help="Decode all images once into memory (small data sets)."),
    time_limit: float = typer.Option(0, help="Stop after this many minutes with a checkpoint (0: no limit)."),
    judge: Path = typer.Option(
        None, "--judge",
        help="Attribute classifier (TorchScript, one logit per attribute, in --attributes order): at the end, "
             "measure per-attribute edit success into card.json, which names the backbone's blind spots."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    config_file: Path = o.CONFIG,
):
    """Train an AttGAN backbone (WGAN-GP, public AttGAN defaults) on any CelebA-layout data."""
    names = [a.strip() for a in attributes.split(",") if a.strip()]
    if not names:
        from sia_cli.data import read_attributes

        names = read_attributes(attrs).names
    config = TrainConfig(
        images=images, attrs_file=attrs, attributes=names, out=out, img_size=img_size, batch_size=batch_size,
        max_steps=max_steps, n_d=n_d, enc_dim=enc_dim, dec_dim=dec_dim, enc_layers=layers, dec_layers=layers,
        dis_dim=dis_dim, dis_layers=layers, dis_fc_dim=dis_fc_dim, shortcut_layers=shortcut_layers,
        inject_layers=inject_layers, lr=lr, sample_every=sample_every, save_every=save_every, resume=resume,
        device=pick_device(device), seed=seed, workers=workers, preload=preload,
        time_limit=time_limit * 60 or None, judge=judge,
    )
    with rich_progress(progress_enabled(no_progress)) as progress:
        summary = run_training(config, progress)
    if not main_process():
        return
    losses = "  ".join(f"{k}={v:.3g}" for k, v in summary["losses"].items())
    console.print(f"trained to step {summary['steps']} (from {summary['resumed_from']}) on {summary['images']} images in {summary['seconds']:.0f} s")
    console.print(f"losses: {losses}")
    # A user's path may contain `[...]`: print it as text, never as Rich markup.
    console.print(f"checkpoint: {summary['checkpoint']}", markup=False, highlight=False)
    if summary.get("card"):
        console.print(f"card: {out / 'card.json'} (measured: {summary['card'].get('measured', '')})",
                      markup=False, highlight=False)
