"""`sia train-gan`: train an AttGAN backbone on a CelebA-layout folder."""

from pathlib import Path

import typer

from sia_cli.backbone.trainer import TrainConfig
from sia_cli.jobs.train_gan import train_gan as run_training
from sia_cli.cli import options as o
from sia_cli.cli.common import console, handle_errors, main_process, progress_enabled, rich_progress


def default(name: str):
    return o.default(TrainConfig, name)


@handle_errors
def train_gan(
    images: Path = typer.Option(..., "--images", help="Folder of training images."),
    attrs: Path = typer.Option(..., "--attrs", help="CelebA list_attr file for those images."),
    out: Path = typer.Option(..., "--out", help="Experiment folder: setting.txt, checkpoint/, sample_training/."),
    attributes: str = typer.Option("", "--attributes", help="Comma-separated attribute names (default: all in --attrs)."),
    img_size: int = typer.Option(default("img_size"), help="Images are centre-cropped and resized to this size."),
    batch_size: int = typer.Option(default("batch_size"), help="Images per batch (per process under torchrun)."),
    max_steps: int = typer.Option(default("max_steps"), help="Generator steps to train to (each after --n-d critic steps)."),
    n_d: int = typer.Option(default("n_d"), help="Critic steps per generator step."),
    enc_dim: int = typer.Option(default("enc_dim"), help="Encoder width of the first layer (doubles per layer, max 1024)."),
    dec_dim: int = typer.Option(default("dec_dim"), help="Decoder width of the last hidden layer."),
    layers: int = typer.Option(default("enc_layers"), help="Encoder, decoder and critic depth (stride-2 layers)."),
    dis_dim: int = typer.Option(default("dis_dim"), help="Critic width of the first layer."),
    dis_fc_dim: int = typer.Option(default("dis_fc_dim"), help="Width of the critic's fully connected heads."),
    shortcut_layers: int = typer.Option(default("shortcut_layers"), help="Encoder maps concatenated into the decoder."),
    inject_layers: int = typer.Option(default("inject_layers"), help="Decoder layers that receive the attributes again."),
    refine_layers: int = typer.Option(
        default("refine_layers"),
        help="Residual 3x3 blocks before the image layer (ours, not public AttGAN's): room for small features."),
    detail_layers: int = typer.Option(
        default("detail_layers"),
        help="3x3 blocks at the image's resolution that read the input image (ours, not public AttGAN's): "
             "fine detail kept instead of drawn again from coarse maps."),
    detail_only: bool = typer.Option(
        default("detail_only"), "--detail-only",
        help="Train only the detail blocks (and the critic): the rest of the generator stays as the run "
             "started, so its edits stay as they were while its images sharpen."),
    detail_gate: float = typer.Option(
        default("detail_gate"),
        help="Fade the detail blocks' addition where the decoder's image departs this far from the input "
             "(in [0, 1], averaged over 5x5 pixels): they sharpen the image without undoing an edit (0: no gate)."),
    lr: float = typer.Option(default("lr"), help="Adam learning rate (betas 0.5, 0.999)."),
    sample_every: int = typer.Option(default("sample_every"), help="Write a sample grid every N steps."),
    save_every: int = typer.Option(default("save_every"), help="Write a checkpoint every N steps."),
    force: bool = typer.Option(
        default("force"), "--force",
        help="Start over: remove what an earlier training wrote into --out (by default a rerun continues "
             "from its latest checkpoint, also to a raised --max-steps; a finished run is refused)."),
    # Not the engine's default (cpu): on the command line the machine decides.
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)."),
    seed: int = typer.Option(default("seed"), help="Random seed."),
    workers: int = typer.Option(
        default("workers"),
        help="Data-loading worker processes. On a CPU-only machine they take cores from the training step "
             "(--preload is faster for data sets that fit in memory)."),
    preload: bool = typer.Option(default("preload"), "--preload", help="Decode all images once into memory (small data sets)."),
    amp: str = typer.Option(
        default("amp"), "--amp", metavar="bf16",
        help="Mixed precision: bf16 autocasts the forward passes; the losses and the gradient penalty stay fp32. "
             "For GPUs with bf16 (refused on one without). Allowed on CPU, where speed depends on bf16 hardware: "
             "about 1.2x the fp32 steps/s on a CPU with AMX, far slower on one without bf16 (bench/RESULTS.md)."),
    compile: bool = typer.Option(
        default("compile"), "--compile",
        help="torch.compile the forward passes (the gradient penalty's stays eager): about 1.2x the steps/s on "
             "this project's CPU, after compiling at the start. One process only (refused under torchrun)."),
    # Minutes here, seconds (or None) in the engine: 0 is the command line's "no limit".
    time_limit: float = typer.Option(0, help="Stop after this many minutes with a checkpoint (0: no limit)."),
    judge: Path = typer.Option(
        None, "--judge",
        help="Attribute classifier (TorchScript, one logit per attribute, in --attributes order): at the end, "
             "measure per-attribute edit success into card.json, which names the backbone's blind spots, with "
             "each edit's off-target change rate and the judge's own accuracy."),
    counterfactuals: bool = typer.Option(
        None, "--counterfactuals/--no-counterfactuals",
        help="Supervise each one-attribute edit with the face drawn again with that edit (its true "
             "counterfactual; needs a `sia synth` folder, which records how it drew its faces). "
             "Default: on for a `sia synth` folder, off elsewhere (AttGAN's losses alone)."),
    lambda_pair: float = typer.Option(default("lambda_pair"), help="Weight of the L1 between each edit and its counterfactual."),
    lambda_change: float = typer.Option(
        default("lambda_change"),
        help="Weight of the change's error averaged over the pixels the edit truly changes, so small "
             "features count as much as large ones."),
    change_focus: float = typer.Option(
        default("change_focus"),
        help="Weigh each attribute's change loss by (its running mean / the mean over attributes) to this power: "
             "the edits the generator does worst by its own loss get more of the gradient (0: all alike)."),
    change_threshold: float = typer.Option(default("change_threshold"), help="A pixel that moves less (in [0, 1]) counts as unchanged."),
    lr_schedule: str = typer.Option(default("lr_schedule"), help="constant, or cosine (down to 5% of --lr at --max-steps)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    config_file: Path = o.CONFIG,
):
    """Train an AttGAN backbone (WGAN-GP, public AttGAN defaults) on any CelebA-layout data."""
    config = o.build(TrainConfig, locals())
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
