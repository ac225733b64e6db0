"""`swarmtrain audit ...`: privacy audits (reconstruction attack, membership inference).

The main CLI adds this group with `main.add_command(audit)`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import click

from .config import DEFAULT_ADVERSARY_WEIGHT, DEFAULT_CUT_NOISE, DEFAULT_WARMUP_STEPS


def parse_alphas(value: str) -> List[float]:
    """"0,0.5,1,2" -> [0.0, 0.5, 1.0, 2.0]; ValueError naming the offending item otherwise."""
    if not value or not value.strip():
        raise ValueError("give at least one α, e.g. 0,0.5,1,2")
    alphas = []
    for item in value.split(","):
        item = item.strip()
        try:
            alpha = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number (expected a comma-separated list such as 0,0.5,1,2)") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"α must be a finite number ≥ 0, got {item!r}")
        if alpha in alphas:
            raise ValueError(f"α {item!r} is listed twice")
        alphas.append(alpha)
    return alphas


class CommaList(click.ParamType):
    """A comma-separated flag that `parse` turns into a list, raising ValueError with the user's message.

    (cli/options.ParsedValue does the same; importing it from here would make an import cycle, since
    cli/main.py imports this module to register the `audit` group.)

    :param name: the metavar shown in --help
    :param parse: text -> list
    """

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return self.parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


@click.group(name="audit")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads; the audit models are tiny, so more threads mostly add contention.")
def audit(threads: int) -> None:
    """Privacy audits: what an attacker learns from shared activations or from a trained model.

    Each audit writes a JSON report and PNG figures into its --out directory.
    """
    import torch

    torch.set_num_threads(threads)


def parse_seeds(value: str) -> List[int]:
    """"0,1,2" -> [0, 1, 2]; ValueError naming the offending item otherwise."""
    seeds = []
    for item in (value or "").split(","):
        item = item.strip()
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not an integer (expected a comma-separated list such as 0,1,2)") from None
        if seed < 0 or seed in seeds:
            raise ValueError(f"seed {item!r} is negative or listed twice")
        seeds.append(seed)
    return seeds


@audit.command()
@click.option("--alphas", type=CommaList("ALPHAS", parse_alphas), default="0,1,3", show_default=True,
              help="Comma-separated NoPeek weights α (≥ 0) to train and attack, each with the --cut-noise and "
                   "--adversary-weight given; an undefended model is always trained too, as the reference.")
@click.option("--cut-noise", type=click.FloatRange(min=0, max=100), default=DEFAULT_CUT_NOISE, show_default=True,
              help="Noise calibrated at the cut: Z is released as Z/rms(Z) + σ·N(0,1); 0 releases Z as is.")
@click.option("--adversary-weight", type=click.FloatRange(min=0), default=DEFAULT_ADVERSARY_WEIGHT,
              show_default=True, help="Weight λ of the adversarial reconstruction term (0: none).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=DEFAULT_WARMUP_STEPS, show_default=True,
              help="Training steps (14 per epoch) over which the α and adversary terms ramp up from 0.")
@click.option("--cut-width", type=click.IntRange(min=1, max=4096), default=64, show_default=True,
              help="Width of Z, the layer the owner releases.")
@click.option("--seeds", type=CommaList("SEEDS", parse_seeds), default="0,1,2", show_default=True,
              help="Comma-separated seeds; each fixes the data split, the models and the attackers. The report "
                   "gives the mean and spread over them.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for reconstruction.json and the PNG figures (created if missing).")
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training epochs of the digits classifier in every setting.")
@click.option("--attacker-epochs", type=click.IntRange(min=1), default=400, show_default=True,
              help="Most epochs of each attacker's decoder (it stops earlier once its validation error stops falling).")
def reconstruction(alphas: List[float], cut_noise: float, adversary_weight: float, warmup_steps: int, cut_width: int,
                   seeds: List[int], out_dir: Path, epochs: int, attacker_epochs: int) -> None:
    """Model-inversion attacks against the privacy head's defences on sklearn's digits.

    The data owner trains an MLP whose cut layer releases Z (loss = CE + α·dCor(X, Z) [+ λ·adversary],
    Z with calibrated noise); attackers holding leaked (X, Z) pairs from a disjoint split (a decoder,
    k-NN, a white-box decoder that knows the noise, and a decoder also given the label) reconstruct
    held-out private images. Reports accuracy, dCor (V and U, on the whole held-out set) and
    reconstruction SSIM/MSE per setting, against the class-mean image an attacker draws from the
    label alone, with a one-line verdict.
    """
    if warmup_steps >= epochs * 14:
        raise click.BadParameter(f"must be smaller than the {epochs * 14} training steps of --epochs {epochs}",
                                 param_hint="--warmup-steps")
    from .audits import reconstruction_audit

    settings = (1 + len(alphas)) * len(seeds)
    with click.progressbar(length=settings, label="training + attacking", show_pos=True,
                           item_show_func=lambda label: label) as bar:
        report = reconstruction_audit(alphas, out_dir, cut_noise=cut_noise, adversary_weight=adversary_weight,
                                      warmup_steps=warmup_steps, cut_width=cut_width, seeds=seeds, epochs=epochs,
                                      attacker_epochs=attacker_epochs, progress=lambda label: bar.update(1, label))
    click.echo(f"{'setting':>24} {'accuracy':>13} {'dCor_V':>6} {'dCor_U':>6} {'SSIM':>13} {'label-only':>10}")
    for row in report["results"]:
        click.echo(f"{row['setting']:>24} {row['test_accuracy']['mean']:>6.3f}±{row['test_accuracy']['std']:<6.3f} "
                   f"{row['dcor_v']['mean']:>6.3f} {row['dcor_u']['mean']:>6.3f} "
                   f"{row['reconstruction_ssim']['mean']:>6.3f}±{row['reconstruction_ssim']['std']:<6.3f} "
                   f"{row['label_only_ssim']['mean']:>10.3f}")
    click.echo(f"dCor measured on the {report['splits']['held_out_test']} held-out samples; SSIM of the strongest "
               f"attacker that sees Z; label-only = the class-mean image")
    click.echo(f"verdict: {report['verdict']}")
    click.echo(f"wrote {out_dir / 'reconstruction.json'} and {', '.join(report['figures'])}")


@audit.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Audit checkpoint (format swarmtrain-audit-checkpoint/1, e.g. from `audit train-target`): "
                   "model factory, weights, the training (member) data and optionally held-out data.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for membership.json and the PNG figures (created if missing).")
@click.option("--members", "members_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Override the member (training) data: .npz with arrays x and y.")
@click.option("--nonmembers", "nonmembers_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out (non-member) data: .npz with arrays x and y; required if the checkpoint has none.")
@click.option("--model-factory", help="Override the checkpoint's 'package.module:callable' that builds the model.")
@click.option("--loss-bound", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="B: per-sample cross-entropy is clipped to [0, B] for the attack and the loss-gap bound.")
def membership(checkpoint: Path, out_dir: Path, members_path, nonmembers_path, model_factory, loss_bound: float) -> None:
    """Loss-threshold membership inference against a trained classifier.

    Guesses "member" when a sample's loss is below a threshold τ and sweeps τ. Reports the advantage
    max_τ(TPR − FPR) with its p-value (a one-sided Kolmogorov–Smirnov test: is it more than chance?),
    AUC, TPR at 1% FPR and the loss-gap lower bound ½ + (E_test ℓ − E_train ℓ)/(2B), and a verdict.
    """
    from .audits import load_audit_checkpoint, load_labelled_npz, membership_audit

    try:
        model, members, nonmembers = load_audit_checkpoint(checkpoint, model_factory)
        if members_path is not None:
            members = load_labelled_npz(members_path)
        if nonmembers_path is not None:
            nonmembers = load_labelled_npz(nonmembers_path)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if nonmembers is None:
        raise click.BadParameter("the checkpoint holds no held-out data; pass an .npz with x and y",
                                 param_hint="--nonmembers")
    try:
        report = membership_audit(model, *members, *nonmembers, out_dir, loss_bound=loss_bound, label=checkpoint.name)
    except RuntimeError as e:  # shape mismatch between data and model
        raise click.ClickException(f"the model cannot evaluate this data: {str(e).splitlines()[0]}") from None
    click.echo(f"members {report['n_members']} (acc {report['member_accuracy']:.3f}), "
               f"non-members {report['n_nonmembers']} (acc {report['nonmember_accuracy']:.3f})")
    click.echo(f"advantage {report['advantage']:.3f} (p = {report['p_value']:.2g})  AUC {report['auc']:.3f}  "
               f"TPR@1%FPR {report['tpr_at_1pct_fpr']:.3f}  loss-gap bound {report['loss_gap_bound']:.4f}")
    click.echo(f"verdict: {report['verdict']}")
    click.echo(f"wrote {out_dir / 'membership.json'} and {', '.join(report['figures'])}")


@audit.command(name="train-target")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint file to write (read by `audit membership --checkpoint`).")
@click.option("--n-members", "n_members", type=click.IntRange(min=10, max=440), default=200, show_default=True,
              help="Number of digits the model is trained on; as many held-out digits are stored for the audit.")
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True, help="Training epochs.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="AdamW weight decay (regularisation).")
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
              show_default=True, help="Cross-entropy label smoothing (regularisation).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data split and training.")
def train_target(out_path: Path, n_members: int, epochs: int, weight_decay: float, label_smoothing: float,
                 seed: int) -> None:
    """Train a digits classifier to audit and save it with its member and held-out data."""
    from .audits import save_audit_checkpoint, train_membership_target
    from .digits import load_digits_splits

    splits = load_digits_splits(seed=seed)
    members = (splits.private_x[:n_members], splits.private_y[:n_members])
    nonmembers = (splits.test_x[:n_members], splits.test_y[:n_members])
    with click.progressbar(length=1, label=f"training on {n_members} digits for {epochs} epochs") as bar:
        model = train_membership_target(*members, epochs=epochs, weight_decay=weight_decay,
                                        label_smoothing=label_smoothing, seed=seed)
        bar.update(1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_audit_checkpoint(out_path, model, "swarmtrain.privacy.digits:DigitsNet", {}, members, nonmembers)
    click.echo(f"wrote {out_path}")
