"""Privacy audits: reconstruction (model inversion from leaked (X, Z) pairs) and membership inference.

Both write a JSON report and PNG figures into an output directory and return the report as a dict.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dcor import distance_correlation
from .digits import (IMAGE_SHAPE, Inverter, accuracy, cut_activations, load_digits_splits, minibatches,
                     train_nopeek)

Progress = Optional[Callable[[str], None]]  # called with a short label after each unit of work


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _write_json(path: Path, report: Dict) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Reconstruction attack
# ------------------------------------------------------------------------------------------------
def train_inverter(z: torch.Tensor, x: torch.Tensor, *, epochs: int = 300, batch_size: int = 64, lr: float = 1e-3,
                   seed: int = 0) -> Inverter:
    """The attacker: fit Z → X on leaked pairs with an MSE objective."""
    torch.manual_seed(seed)
    inverter = Inverter(z.shape[1])
    optimizer = torch.optim.Adam(inverter.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    inverter.train()
    for _ in range(epochs):
        for idx in minibatches(len(z), batch_size, generator):
            loss = F.mse_loss(inverter(z[idx]), x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    inverter.eval()
    return inverter


def reconstruction_quality(reconstructed: torch.Tensor, original: torch.Tensor) -> Dict[str, float]:
    """Mean per-pixel MSE and mean SSIM (skimage, 7×7 window, data range 1) over 8×8 images."""
    from skimage.metrics import structural_similarity

    rec = reconstructed.detach().reshape(-1, *IMAGE_SHAPE).double().numpy()
    orig = original.detach().reshape(-1, *IMAGE_SHAPE).double().numpy()
    ssim = [structural_similarity(o, r, data_range=1.0, win_size=7) for o, r in zip(orig, rec)]
    return {"mse": float(np.mean((rec - orig) ** 2)), "ssim": float(np.mean(ssim))}


def reconstruction_audit(alphas: Sequence[float], out_dir: Path, *, epochs: int = 300, warmup_epochs: int = 20,
                         attacker_epochs: int = 300, seed: int = 0, progress: Progress = None) -> Dict:
    """Train the digits classifier at each α, attack each with an inverse network, report and plot.

    Leakage is measured on the whole held-out test set (fixed n), in both V and U forms.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits(seed=seed)
    # What an attacker who learned nothing from Z could do: predict the leaked set's mean image.
    mean_image = splits.leaked_x.mean(dim=0, keepdim=True).expand_as(splits.test_x)
    baseline = reconstruction_quality(mean_image, splits.test_x)
    # What an attacker gets from the label alone (which any useful Z reveals, and which split
    # training sends anyway): the leaked set's mean image of the true class.
    class_means = torch.stack([splits.leaked_x[splits.leaked_y == c].mean(dim=0) for c in range(10)])
    label_baseline = reconstruction_quality(class_means[splits.test_y], splits.test_x)

    rows: List[Dict] = []
    reconstructions: Dict[float, torch.Tensor] = {}
    for alpha in alphas:
        model, _head = train_nopeek(splits.private_x, splits.private_y, alpha=alpha, epochs=epochs,
                                    warmup_epochs=warmup_epochs, seed=seed)
        z_test = cut_activations(model, splits.test_x)
        z_leaked = cut_activations(model, splits.leaked_x)
        inverter = train_inverter(z_leaked, splits.leaked_x, epochs=attacker_epochs, seed=seed)
        with torch.no_grad():
            rec = inverter(z_test)
        quality = reconstruction_quality(rec, splits.test_x)
        rows.append({
            "alpha": alpha,
            "test_accuracy": accuracy(model, splits.test_x, splits.test_y),
            "dcor_v": float(distance_correlation(splits.test_x, z_test)),
            "dcor_u": float(distance_correlation(splits.test_x, z_test, unbiased=True)),
            "reconstruction_mse": quality["mse"],
            "reconstruction_ssim": quality["ssim"],
        })
        reconstructions[alpha] = rec
        if progress is not None:
            progress(f"alpha={alpha:g}")

    report = {
        "audit": "reconstruction",
        "dataset": "sklearn digits 8x8, pixels/16",
        "splits": {"private_train": len(splits.private_x), "attacker_leaked_pairs": len(splits.leaked_x),
                   "held_out_test": len(splits.test_x)},
        "leakage_measured_on": f"held-out test set, n={len(splits.test_x)}; dcor_v = V-statistic dCor, "
                               f"dcor_u = sqrt(max(U-statistic dCor^2, 0))",
        "settings": {"epochs": epochs, "warmup_epochs": warmup_epochs, "attacker_epochs": attacker_epochs,
                     "seed": seed},
        "mean_image_baseline": {"reconstruction_mse": baseline["mse"], "reconstruction_ssim": baseline["ssim"]},
        "class_mean_baseline": {"reconstruction_mse": label_baseline["mse"],
                                "reconstruction_ssim": label_baseline["ssim"]},
        "results": rows,
        "figures": ["privacy_utility.png", "reconstruction_metrics.png", "reconstructions.png"],
    }
    _write_json(out_dir / "reconstruction.json", report)
    _plot_reconstruction(out_dir, rows, baseline, label_baseline, splits.test_x, reconstructions)
    return report


def _plot_reconstruction(out_dir: Path, rows: List[Dict], baseline: Dict, label_baseline: Dict, test_x: torch.Tensor,
                         reconstructions: Dict[float, torch.Tensor]) -> None:
    plt = _pyplot()
    alphas = [r["alpha"] for r in rows]

    fig, ax = plt.subplots(figsize=(5.5, 4))
    # markers, not a line: α orders the runs, but accuracy need not be monotone in α
    ax.scatter([r["dcor_v"] for r in rows], [r["test_accuracy"] for r in rows], marker="o", label="dCor (V)", zorder=3)
    ax.scatter([r["dcor_u"] for r in rows], [r["test_accuracy"] for r in rows], marker="s", alpha=0.5,
               label="dCor (U)", zorder=3)
    for i, r in enumerate(rows):  # alternate label heights: neighbouring α often share an accuracy
        ax.annotate(f"α={r['alpha']:g}", (r["dcor_v"], r["test_accuracy"]), textcoords="offset points",
                    xytext=(4, 4 if i % 2 == 0 else -11), fontsize=8)
    reference = next((r for r in rows if r["alpha"] == 0), None)
    if reference is not None:
        ax.axhline(reference["test_accuracy"] - 0.03, color="gray", ls=":", label="α=0 accuracy − 3 points")
    ax.axvline(0.3, color="tab:green", ls="--", lw=0.8, label="dCor = 0.3")
    low = min(r["test_accuracy"] for r in rows)
    ax.set_ylim(min(low, (reference or rows[0])["test_accuracy"] - 0.03) - 0.01, 1.0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("leakage dCor(X, Z) on held-out data")
    ax.set_ylabel("test accuracy")
    ax.set_title("privacy–utility trade-off (NoPeek)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "privacy_utility.png", dpi=120)
    plt.close(fig)

    fig, (ax_mse, ax_ssim) = plt.subplots(1, 2, figsize=(8, 3.5))
    ax_mse.plot(alphas, [r["reconstruction_mse"] for r in rows], "o-")
    ax_mse.axhline(baseline["mse"], color="gray", ls=":", label="mean image (knows nothing)")
    ax_mse.axhline(label_baseline["mse"], color="tab:green", ls="--", label="class-mean image (knows the label)")
    ax_mse.set_xlabel("α")
    ax_mse.set_ylabel("reconstruction MSE (higher = more private)")
    ax_mse.legend(fontsize=8)
    ax_ssim.plot(alphas, [r["reconstruction_ssim"] for r in rows], "o-", color="tab:orange")
    ax_ssim.axhline(baseline["ssim"], color="gray", ls=":", label="mean image (knows nothing)")
    ax_ssim.axhline(label_baseline["ssim"], color="tab:green", ls="--", label="class-mean image (knows the label)")
    ax_ssim.set_xlabel("α")
    ax_ssim.set_ylabel("reconstruction SSIM (lower = more private)")
    ax_ssim.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reconstruction_metrics.png", dpi=120)
    plt.close(fig)

    shown = 10
    n_rows = 1 + len(rows)
    fig, axes = plt.subplots(n_rows, shown, figsize=(shown * 0.9, n_rows * 1.0), squeeze=False)
    labels = ["original"] + [f"α={a:g}" for a in alphas]
    images = [test_x[:shown]] + [reconstructions[a][:shown] for a in alphas]
    for row, (label, batch) in enumerate(zip(labels, images)):
        for col in range(shown):
            ax = axes[row][col]
            ax.imshow(batch[col].reshape(IMAGE_SHAPE).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("held-out images reconstructed by the attacker from Z", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "reconstructions.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Membership inference (loss-threshold attack)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def per_sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    # float64 log-softmax: in float32 a confident prediction's loss rounds to exactly 0, and those
    # ties between members and non-members would blind the threshold attack.
    losses = [F.cross_entropy(model(x[i:i + batch_size]).double(), y[i:i + batch_size], reduction="none")
              for i in range(0, len(x), batch_size)]
    return torch.cat(losses).double().numpy()


def membership_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, loss_bound: float) -> Dict:
    """Loss-threshold attack ("member if loss < τ") over all τ.

    advantage = max_τ TPR − FPR; auc from sklearn; tpr_at_1pct_fpr = best TPR with FPR ≤ 0.01;
    loss_gap_bound = ½ + (E_nonmember ℓ − E_member ℓ)/(2B) with ℓ clipped to [0, B]: a lower bound
    on the balanced accuracy of the best threshold attack on the clipped loss (Del Grosso et al. 2021),
    comparable with best_balanced_accuracy = ½ + advantage/2.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if loss_bound <= 0 or not math.isfinite(loss_bound):
        raise ValueError(f"loss_bound must be a positive finite number, got {loss_bound}")
    member = np.clip(np.asarray(member_losses, dtype=np.float64), 0.0, loss_bound)
    nonmember = np.clip(np.asarray(nonmember_losses, dtype=np.float64), 0.0, loss_bound)
    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("membership attack needs at least one member and one non-member sample")
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    scores = -np.concatenate([member, nonmember])  # low loss ⇒ "member"
    fpr, tpr, _ = roc_curve(labels, scores)
    advantage = float(np.max(tpr - fpr))
    low_fpr = fpr <= 0.01
    return {
        "n_members": int(len(member)),
        "n_nonmembers": int(len(nonmember)),
        "loss_bound": loss_bound,
        "mean_member_loss": float(member.mean()),
        "mean_nonmember_loss": float(nonmember.mean()),
        "advantage": advantage,
        "best_balanced_accuracy": 0.5 + advantage / 2,
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": float(tpr[low_fpr].max()) if low_fpr.any() else 0.0,
        "loss_gap_bound": float(0.5 + (nonmember.mean() - member.mean()) / (2 * loss_bound)),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def membership_audit(model: nn.Module, member_x: torch.Tensor, member_y: torch.Tensor, nonmember_x: torch.Tensor,
                     nonmember_y: torch.Tensor, out_dir: Path, *, loss_bound: float = 10.0,
                     label: str = "model") -> Dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    member_losses = per_sample_losses(model, member_x, member_y)
    nonmember_losses = per_sample_losses(model, nonmember_x, nonmember_y)
    result = membership_attack(member_losses, nonmember_losses, loss_bound=loss_bound)
    report = {"audit": "membership", "model": label, "attack": "loss threshold (member if loss < tau)",
              "member_accuracy": accuracy(model, member_x, member_y),
              "nonmember_accuracy": accuracy(model, nonmember_x, nonmember_y), **result,
              "figures": ["membership_roc.png", "membership_losses.png"]}
    _write_json(out_dir / "membership.json", report)

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"AUC={result['auc']:.3f}, adv={result['advantage']:.3f}")
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"membership inference: {label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "membership_roc.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, min(loss_bound, max(member_losses.max(), nonmember_losses.max()) + 1e-9), 40)
    ax.hist(np.clip(member_losses, 0, loss_bound), bins=bins, alpha=0.6, density=True, label="members (train)")
    ax.hist(np.clip(nonmember_losses, 0, loss_bound), bins=bins, alpha=0.6, density=True, label="non-members")
    ax.set_xlabel(f"per-sample loss (clipped to B={loss_bound:g})")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "membership_losses.png", dpi=120)
    plt.close(fig)
    return report


# ------------------------------------------------------------------------------------------------
# Membership-audit checkpoints: a model plus the data it was (and was not) trained on
# ------------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "swarmtrain-audit-checkpoint/1"


def save_audit_checkpoint(path: Path, model: nn.Module, model_factory: str, model_kwargs: Dict,
                          members: Tuple[torch.Tensor, torch.Tensor],
                          nonmembers: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Save what `swarmtrain audit membership` reads.

    model_factory: "package.module:callable" building the architecture from model_kwargs (a
    state dict, not a pickled module, so loading runs no stored code: torch.load(weights_only=True)).
    """
    payload = {"format": CHECKPOINT_FORMAT, "model_factory": model_factory, "model_kwargs": dict(model_kwargs),
               "state_dict": model.state_dict(), "members": {"x": members[0], "y": members[1]}}
    if nonmembers is not None:
        payload["nonmembers"] = {"x": nonmembers[0], "y": nonmembers[1]}
    torch.save(payload, path)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model factory must look like 'package.module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model factory {spec!r}: {e}") from None


def load_audit_checkpoint(path: Path, model_factory: Optional[str] = None):
    """Return (model, members, nonmembers-or-None); raise ValueError with a readable reason."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch checkpoint: {e.__class__.__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (see `swarmtrain audit train-target`)")
    factory = _import_factory(model_factory or payload["model_factory"])
    model = factory(**payload.get("model_kwargs", {}))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit the model built by the factory: {e}") from None
    members = (payload["members"]["x"], payload["members"]["y"])
    nonmembers = (payload["nonmembers"]["x"], payload["nonmembers"]["y"]) if "nonmembers" in payload else None
    return model, members, nonmembers


def load_labelled_npz(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """An .npz with arrays `x` (features) and `y` (int class ids)."""
    try:
        with np.load(path) as data:
            x, y = data["x"], data["y"]
    except KeyError as e:
        raise ValueError(f"{path} must contain arrays 'x' and 'y' (missing {e})") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from None
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def train_membership_target(members_x: torch.Tensor, members_y: torch.Tensor, *, epochs: int,
                            weight_decay: float = 0.0, label_smoothing: float = 0.0, batch_size: int = 32,
                            lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A digits classifier to audit: many epochs and no regularisation overfit; weight decay,
    label smoothing and few epochs regularise."""
    from .digits import DigitsNet

    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in minibatches(len(members_x), min(batch_size, len(members_x)), generator):
            loss = F.cross_entropy(model(members_x[idx]), members_y[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model
