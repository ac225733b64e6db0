"""Privacy audits: reconstruction (model inversion from leaked (X, Z) pairs) and membership inference.

Both write a JSON report and PNG figures into an output directory and return the report as a dict;
each report carries a one-line `verdict`, which the CLI prints and every figure shows.

Reconstruction: the bar is the attacker who knows only the label and draws the class-mean image of
its auxiliary (leaked) data. A defence "leaks nothing beyond the label" when the strongest attacker
that sees Z (a decoder, k-NN, and with cut noise a white-box decoder that knows the defence) does
no better in SSIM than that image, averaged over seeds.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_ADVERSARY_WEIGHT, DEFAULT_CUT_NOISE, DEFAULT_WARMUP_STEPS, PrivacyConfig
from .dcor import distance_correlation
from .digits import (DIGITS_CUT_LAYER, IMAGE_SHAPE, NUM_CLASSES, NUM_FEATURES, DigitsNet, DigitsSplits, accuracy,
                     cut_activations, load_digits_splits, minibatches, train_private)
from .head import PrivacyHead, calibrated_release, owner_head_config

Progress = Optional[Callable[[str], None]]  # called with a short label after each unit of work
NO_DEFENCE = "no defence"
DEFAULT_CUT_WIDTH = 64  # DigitsNet's cut width, the audit's model


def headless_pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _write_json(path: Path, report: Dict) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Reconstruction attack
# ------------------------------------------------------------------------------------------------
# The attacker's decoder: deep and wide enough that more capacity stopped helping on digits (hidden
# 512 vs 1024 vs 256: SSIM within 0.002), trained with early stopping on a fifth of its leaked pairs.
ATTACKER_HIDDEN = 512
ATTACKER_PATIENCE = 40      # epochs without a better validation MSE before the attacker stops
KNN_CHOICES = (1, 3, 5, 10, 20)
PERMUTATIONS = 5            # permutations of Z behind the V statistic's independence level
ATTACK_NAMES = {"decoder": "decoder", "knn": "k-NN", "whitebox": "white-box decoder that knows the defence",
                "label_aware": "decoder given the label too"}
ACCURACY_DRAWS = 10        # noise draws the accuracy under cut noise is averaged over
PENALTY_BATCH = 64          # the batch the head's dCor penalty sees in training


def _decoder(z_features: int, hidden: int = ATTACKER_HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(z_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_FEATURES), nn.Sigmoid())


def train_decoder(z: torch.Tensor, x: torch.Tensor, z_val: torch.Tensor, x_val: torch.Tensor, *,
                  max_epochs: int = 400, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                  fresh_inputs: Optional[Callable[[torch.Generator], torch.Tensor]] = None) -> nn.Module:
    """The attacker: fit Z → X with an MSE objective; keep the epoch with the best validation MSE.

    fresh_inputs: if given, called every epoch for new training inputs (an attacker who can produce
    releases itself, e.g. clean activations plus freshly drawn noise, trains on unlimited samples).
    """
    torch.manual_seed(seed)
    decoder = _decoder(z.shape[1])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, since_best = math.inf, None, 0
    for _ in range(max_epochs):
        inputs = fresh_inputs(generator) if fresh_inputs is not None else z
        decoder.train()
        for idx in minibatches(len(inputs), batch_size, generator):
            loss = F.mse_loss(decoder(inputs[idx]), x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        decoder.eval()
        with torch.no_grad():
            val = float(F.mse_loss(decoder(z_val), x_val))
        if val < best:
            best, best_state, since_best = val, copy.deepcopy(decoder.state_dict()), 0
        else:
            since_best += 1
            if since_best >= ATTACKER_PATIENCE:
                break
    decoder.load_state_dict(best_state)
    decoder.eval()
    return decoder


def knn_reconstruction(z: torch.Tensor, x: torch.Tensor, z_val: torch.Tensor, x_val: torch.Tensor,
                       z_query: torch.Tensor) -> torch.Tensor:
    """A non-parametric attacker: the distance-weighted mean of the k leaked images nearest in Z,
    k chosen on the validation pairs, then refitted on all leaked pairs."""
    from sklearn.neighbors import KNeighborsRegressor

    def fit(k, inputs, targets):
        return KNeighborsRegressor(n_neighbors=min(k, len(inputs)), weights="distance").fit(inputs.numpy(),
                                                                                          targets.numpy())

    errors = {k: float(np.mean((fit(k, z, x).predict(z_val.numpy()) - x_val.numpy()) ** 2)) for k in KNN_CHOICES}
    best_k = min(errors, key=errors.get)
    predicted = fit(best_k, torch.cat([z, z_val]), torch.cat([x, x_val])).predict(z_query.numpy())
    return torch.as_tensor(predicted, dtype=torch.float32)


def reconstruction_quality(reconstructed: torch.Tensor, original: torch.Tensor) -> Dict[str, float]:
    """Mean per-pixel MSE and mean SSIM (skimage, 7×7 window, data range 1) over 8×8 images."""
    from skimage.metrics import structural_similarity

    rec = reconstructed.detach().reshape(-1, *IMAGE_SHAPE).double().numpy()
    orig = original.detach().reshape(-1, *IMAGE_SHAPE).double().numpy()
    ssim = [structural_similarity(o, r, data_range=1.0, win_size=7) for o, r in zip(orig, rec)]
    return {"mse": float(np.mean((rec - orig) ** 2)), "ssim": float(np.mean(ssim))}


def label_only_baselines(splits: DigitsSplits) -> Dict[str, Dict[str, float]]:
    """What an attacker draws without Z: the leaked set's mean image (knows nothing) and the leaked
    set's mean image of the sample's true class (knows the label, which any useful Z reveals and a
    split run sends with every training batch)."""
    mean_image = splits.leaked_x.mean(dim=0, keepdim=True).expand_as(splits.test_x)
    class_means = torch.stack([splits.leaked_x[splits.leaked_y == c].mean(dim=0) for c in range(NUM_CLASSES)])
    return {"mean_image": reconstruction_quality(mean_image, splits.test_x),
            "class_mean": reconstruction_quality(class_means[splits.test_y], splits.test_x)}


@torch.no_grad()
def leakage_figures(x: torch.Tensor, z: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """dCor(X, Z) on the whole batch given (n = len(x)): the V statistic; the V statistic of Z with its
    rows shuffled (the level an independent Z of the same shape scores at this n: V is biased
    upward); the bias-corrected U statistic (the figure the privacy head reports); and the V
    statistic with its independence level on batches of PENALTY_BATCH, the estimator the NoPeek
    penalty descends in training."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = lambda t: t[torch.randperm(len(t), generator=generator)]  # noqa: E731
    batches = [slice(start, start + PENALTY_BATCH) for start in range(0, len(x) - PENALTY_BATCH + 1, PENALTY_BATCH)]
    return {"dcor_v": float(distance_correlation(x, z)),
            "dcor_v_independent": float(np.mean([float(distance_correlation(x, shuffled(z)))
                                                 for _ in range(PERMUTATIONS)])),
            "dcor_u": float(distance_correlation(x, z, unbiased=True)), "dcor_n": int(len(x)),
            "dcor_v_batch": float(np.mean([float(distance_correlation(x[b], z[b])) for b in batches])),
            "dcor_v_batch_independent": float(np.mean([float(distance_correlation(x[b], shuffled(z[b])))
                                                       for b in batches]))}


def attack_released(model: DigitsNet, head: PrivacyHead, splits: DigitsSplits, z_leaked: torch.Tensor,
                    z_test: torch.Tensor, *, seed: int = 0, max_epochs: int = 400) -> Dict[str, torch.Tensor]:
    """Run every attacker against the released Z; return {attack: reconstructed held-out images}.

    decoder, knn: fitted on the leaked (X, released Z) pairs, then fed the released Z of the held-out
    images. whitebox (only with cut noise): the attacker knows the defence: it also holds the owner's
    layers and the noise level, so it trains on clean activations of the leaked images with fresh
    noise every epoch (a learned denoiser with unlimited samples). label_aware: a decoder given Z and
    the true label: how far it beats the class-mean image is what Z reveals beyond the label.
    Detaches the head (its hook would add the noise to the white-box attacker's clean activations).
    """
    n_val = len(splits.leaked_x) // 5
    x_fit, x_val = splits.leaked_x[n_val:], splits.leaked_x[:n_val]
    z_fit, z_val = z_leaked[n_val:], z_leaked[:n_val]
    decoder = train_decoder(z_fit, x_fit, z_val, x_val, seed=seed, max_epochs=max_epochs)
    images = {"decoder": decoder(z_test).detach(), "knn": knn_reconstruction(z_fit, x_fit, z_val, x_val, z_test)}
    sigma = head.config.cut_noise
    head.remove()
    if sigma > 0:
        clean = cut_activations(model, x_fit)  # no hook any more: the activations before the noise
        decoder = train_decoder(z_fit, x_fit, z_val, x_val, seed=seed, max_epochs=max_epochs,
                                fresh_inputs=lambda generator: calibrated_release(clean, sigma, generator))
        images["whitebox"] = decoder(z_test).detach()
    onehot = lambda y: F.one_hot(y, NUM_CLASSES).float()  # noqa: E731
    with_label = lambda z, y: torch.cat([z, onehot(y)], dim=1)  # noqa: E731
    n_fit_y, val_y = splits.leaked_y[n_val:], splits.leaked_y[:n_val]
    decoder = train_decoder(with_label(z_fit, n_fit_y), x_fit, with_label(z_val, val_y), x_val, seed=seed,
                            max_epochs=max_epochs)
    images["label_aware"] = decoder(with_label(z_test, splits.test_y)).detach()
    return images


def audit_defence(splits: DigitsSplits, privacy: PrivacyConfig, *, cut_width: int = 64, epochs: int = 300,
                  attacker_epochs: int = 400, seed: int = 0) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Train the digits model with `privacy` (a run config's privacy section), attack what it releases;
    return (row, {attack: reconstructed held-out images}). The row's `strongest` is the attacker that
    sees only Z (not the label) with the highest SSIM: the one the verdict is about."""
    model, head = train_private(splits.private_x, splits.private_y, privacy, epochs=epochs, cut_width=cut_width,
                                seed=seed)
    z_leaked, z_test = cut_activations(model, splits.leaked_x), cut_activations(model, splits.test_x)
    # the trunk only ever sees released Z: accuracy with the owner's noise in it, averaged over draws
    # (one draw moves the accuracy of 447 samples by up to ±1 point)
    draws = [z_test] + [cut_activations(model, splits.test_x) for _ in range(ACCURACY_DRAWS - 1)
                        if privacy.enabled and privacy.cut_noise > 0]
    with torch.no_grad():
        test_accuracy = float(np.mean([float((model.classifier(z).argmax(dim=1) == splits.test_y).float().mean())
                                       for z in draws]))
    row = {"seed": seed, "test_accuracy": test_accuracy, **leakage_figures(splits.test_x, z_test, seed)}
    images = attack_released(model, head, splits, z_leaked, z_test, seed=seed, max_epochs=attacker_epochs)
    row["attacks"] = {name: reconstruction_quality(rec, splits.test_x) for name, rec in images.items()}
    z_only = [name for name in images if name != "label_aware"]
    row["strongest"] = max(z_only, key=lambda name: row["attacks"][name]["ssim"])
    row["reconstruction_ssim"] = row["attacks"][row["strongest"]]["ssim"]
    row["reconstruction_mse"] = min(row["attacks"][name]["mse"] for name in z_only)
    row["label_only"] = label_only_baselines(splits)
    return row, images


def _spread(values: Sequence[float]) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def summarise_setting(label: str, privacy: PrivacyConfig, cut_width: int, runs: List[Dict],
                      reference_accuracy: Dict[int, float]) -> Dict:
    """Mean and spread over seeds of one setting's runs, and its one-line verdict.

    reference_accuracy: {seed: test accuracy without any defence}, for the accuracy change."""
    figures = {
        "test_accuracy": [r["test_accuracy"] for r in runs],
        "accuracy_change": [r["test_accuracy"] - reference_accuracy[r["seed"]] for r in runs],
        "dcor_v": [r["dcor_v"] for r in runs], "dcor_v_independent": [r["dcor_v_independent"] for r in runs],
        "dcor_u": [r["dcor_u"] for r in runs], "dcor_v_batch": [r["dcor_v_batch"] for r in runs],
        "dcor_v_batch_independent": [r["dcor_v_batch_independent"] for r in runs],
        "reconstruction_ssim": [r["reconstruction_ssim"] for r in runs],
        "reconstruction_mse": [r["reconstruction_mse"] for r in runs],
        "label_only_ssim": [r["label_only"]["class_mean"]["ssim"] for r in runs],
        "label_only_mse": [r["label_only"]["class_mean"]["mse"] for r in runs],
    }
    summary = {"setting": label, "cut_width": cut_width,
               "privacy": owner_head_config(privacy, DIGITS_CUT_LAYER).model_dump(
                   include={"alpha", "cut_noise", "adversary_weight", "warmup_steps"}),
               "seeds": [r["seed"] for r in runs], **{name: _spread(values) for name, values in figures.items()}}
    summary["attacks"] = {name: _spread([r["attacks"][name]["ssim"] for r in runs]) for name in runs[0]["attacks"]}
    strongest = [r["strongest"] for r in runs]
    summary["strongest_attack"] = max(set(strongest), key=strongest.count)
    summary["seeds_at_label_level"] = sum(r["reconstruction_ssim"] <= r["label_only"]["class_mean"]["ssim"]
                                          for r in runs)
    summary["label_level"] = summary["reconstruction_ssim"]["mean"] <= summary["label_only_ssim"]["mean"]
    summary["verdict"] = setting_verdict(summary)
    return summary


def setting_verdict(summary: Dict) -> str:
    ssim, label_only = summary["reconstruction_ssim"]["mean"], summary["label_only_ssim"]["mean"]
    evidence = (f"strongest attacker, the {ATTACK_NAMES[summary['strongest_attack']]}: SSIM {ssim:.3f} vs "
                f"{label_only:.3f} for the class-mean image, {len(summary['seeds'])} seed(s)")
    accuracy = (f"accuracy {summary['test_accuracy']['mean']:.3f} "
                f"({100 * summary['accuracy_change']['mean']:+.1f} points vs no defence)")
    if summary["label_level"]:
        return f"{summary['setting']}: the attacker reconstructs no better than from the label alone ({evidence}); {accuracy}"
    return (f"{summary['setting']}: the attacker reconstructs better than from the label alone ({evidence}), so Z leaks "
            f"more than the label; {accuracy}")


def overall_verdict(settings: List[Dict], max_accuracy_drop: float = 0.02) -> str:
    """The audit's one line: the most accurate defended setting at the label-only level within the
    accuracy bound, or else the closest one."""
    defended = [s for s in settings if s["setting"] != NO_DEFENCE] or settings
    good = [s for s in defended if s["label_level"] and s["accuracy_change"]["mean"] >= -max_accuracy_drop]
    if good:
        return max(good, key=lambda s: s["test_accuracy"]["mean"])["verdict"]
    closest = min(defended, key=lambda s: s["reconstruction_ssim"]["mean"] - s["label_only_ssim"]["mean"])
    return (f"no setting kept the attacker at the label-only level within {100 * max_accuracy_drop:.0f} accuracy points; "
            f"closest: {closest['verdict']}")


def setting_label(privacy: PrivacyConfig, cut_width: int = DEFAULT_CUT_WIDTH) -> str:
    """"α=3, noise σ=1" and the like; NO_DEFENCE when nothing is on."""
    parts = []
    if privacy.enabled and privacy.alpha > 0:
        parts.append(f"α={privacy.alpha:g}")
    if privacy.enabled and privacy.cut_noise > 0:
        parts.append(f"noise σ={privacy.cut_noise:g}")
    if privacy.enabled and privacy.adversary_weight > 0:
        parts.append(f"adversary λ={privacy.adversary_weight:g}")
    if cut_width != DEFAULT_CUT_WIDTH:
        parts.append(f"cut width {cut_width}")
    return ", ".join(parts) or NO_DEFENCE


def run_settings(settings: Sequence[Tuple[PrivacyConfig, int]], seeds: Sequence[int], *, epochs: int = 300,
                 attacker_epochs: int = 400, progress: Progress = None) -> Tuple[List[Dict], Dict]:
    """Audit each (privacy section, cut width) on every seed (a seed fixes the data split, the model's
    init and the attackers'), always with an undefended reference first; returns (summaries, examples)
    where examples holds seeds[0]'s held-out images and each setting's strongest reconstruction."""
    labelled: Dict[str, Tuple[PrivacyConfig, int]] = {NO_DEFENCE: (PrivacyConfig(), DEFAULT_CUT_WIDTH)}
    for privacy, cut_width in settings:
        labelled.setdefault(setting_label(privacy, cut_width), (privacy, cut_width))
    runs: Dict[str, List[Dict]] = {label: [] for label in labelled}
    examples: Dict = {"reconstructions": {}}
    for seed in seeds:
        splits = load_digits_splits(seed=seed)
        for label, (privacy, cut_width) in labelled.items():
            row, images = audit_defence(splits, privacy, cut_width=cut_width, epochs=epochs,
                                        attacker_epochs=attacker_epochs, seed=seed)
            runs[label].append(row)
            if seed == seeds[0]:
                examples["sizes"] = {"private_train": len(splits.private_x), "attacker_leaked_pairs": len(splits.leaked_x),
                                     "held_out_test": len(splits.test_x)}
                examples["test_x"] = splits.test_x
                examples["reconstructions"][label] = images[row["strongest"]]
                examples["class_mean"] = torch.stack([splits.leaked_x[splits.leaked_y == c].mean(dim=0)
                                                      for c in range(NUM_CLASSES)])[splits.test_y]
            if progress is not None:
                progress(f"seed {seed}: {label}")
    reference = {r["seed"]: r["test_accuracy"] for r in runs[NO_DEFENCE]}
    summaries = [summarise_setting(label, privacy, cut_width, runs[label], reference)
                 for label, (privacy, cut_width) in labelled.items()]
    for summary in summaries:
        summary["runs"] = runs[summary["setting"]]
    return summaries, examples


def reconstruction_audit(alphas: Sequence[float], out_dir: Path, *, cut_noise: float = DEFAULT_CUT_NOISE,
                         adversary_weight: float = DEFAULT_ADVERSARY_WEIGHT,
                         warmup_steps: int = DEFAULT_WARMUP_STEPS, cut_width: int = DEFAULT_CUT_WIDTH,
                         seeds: Sequence[int] = (0,), epochs: int = 300, attacker_epochs: int = 400,
                         progress: Progress = None) -> Dict:
    """Train the digits classifier without defence and at each α (with the other defences as given),
    attack each, write reconstruction.json and the figures into out_dir, return the report."""
    settings = [(PrivacyConfig(enabled=True, cut_layer=DIGITS_CUT_LAYER, alpha=alpha, cut_noise=cut_noise,
                               adversary_weight=adversary_weight, warmup_steps=warmup_steps), cut_width)
                for alpha in alphas]
    summaries, examples = run_settings(settings, seeds, epochs=epochs, attacker_epochs=attacker_epochs,
                                       progress=progress)
    report = {
        "audit": "reconstruction",
        "dataset": "sklearn digits 8x8, pixels/16",
        "splits": examples["sizes"],
        "leakage_measured_on": f"the held-out test set, n={len(examples['test_x'])}, Z as released: dcor_v = V-statistic "
                               f"dCor (biased upward at this n; dcor_v_independent = its value for Z with rows shuffled), "
                               f"dcor_u = sqrt(max(U-statistic dCor^2, 0)), the statistic the privacy head reports",
        "attackers": {name: ATTACK_NAMES[name] for name in ATTACK_NAMES},
        "settings": {"epochs": epochs, "attacker_max_epochs": attacker_epochs, "seeds": list(seeds)},
        "verdict": overall_verdict(summaries),
        "results": summaries,
        "figures": ["privacy_utility.png", "reconstruction_metrics.png", "reconstructions.png"],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "reconstruction.json", report)
    write_reconstruction_figures(out_dir, report, examples)
    return report


def wrap_title(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def privacy_utility_figure(report: Dict):
    """Accuracy against the strongest attacker's SSIM (left) and against dCor U (right), per setting."""
    plt = headless_pyplot()
    results = report["results"]
    reference = next(s for s in results if s["setting"] == NO_DEFENCE)
    floor = reference["test_accuracy"]["mean"] - 0.02
    label_only = float(np.mean([s["label_only_ssim"]["mean"] for s in results]))
    fig, (ax_ssim, ax_dcor) = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key in ((ax_ssim, "reconstruction_ssim"), (ax_dcor, "dcor_u")):
        for i, s in enumerate(results):
            ax.errorbar(s[key]["mean"], s["test_accuracy"]["mean"], xerr=s[key]["std"], yerr=s["test_accuracy"]["std"],
                        fmt="o", capsize=3, zorder=3)
            ax.annotate(s["setting"], (s[key]["mean"], s["test_accuracy"]["mean"]), textcoords="offset points",
                        xytext=(5, 5 if i % 2 == 0 else -12), fontsize=7)
        ax.axhline(floor, color="gray", ls=":", label="no-defence accuracy − 2 points")
        ax.set_ylabel("test accuracy  (higher = more useful ↑)")
        ax.annotate("better", xy=(0.04, 0.96), xytext=(0.22, 0.78), xycoords="axes fraction", fontsize=9,
                    color="tab:green", arrowprops={"arrowstyle": "->", "color": "tab:green"})
        ax.grid(alpha=0.3)
    ax_ssim.axvline(label_only, color="tab:green", ls="--", label="class-mean image (the label alone)")
    ax_ssim.set_xlabel("reconstruction SSIM of the strongest attacker  (← more private)")
    ax_dcor.set_xlabel(f"dCor(X, Z), U statistic, n = {report['splits']['held_out_test']}  (← more private)")
    ax_ssim.legend(fontsize=7, loc="lower right")
    ax_ssim.set_title("privacy–utility: up and to the left is better", fontsize=9)
    ax_dcor.set_title("dependence at the cut (dCor) vs accuracy", fontsize=9)
    fig.suptitle(wrap_title("verdict: " + report["verdict"]), fontsize=8)
    fig.tight_layout()
    return fig


def reconstruction_metrics_figure(report: Dict):
    """Per setting: SSIM of each attacker against the label-only level, and dCor (V, V of an
    independent Z, U)."""
    plt = headless_pyplot()
    results = report["results"]
    labels = [s["setting"] for s in results]
    positions = np.arange(len(results))
    fig, (ax_ssim, ax_dcor) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(results) + 4), 4.8))
    attacks = [name for name in ATTACK_NAMES if any(name in s["attacks"] for s in results)]
    width = 0.8 / len(attacks)
    for i, name in enumerate(attacks):
        values = [s["attacks"].get(name, {"mean": np.nan, "std": 0.0}) for s in results]
        ax_ssim.bar(positions + (i - (len(attacks) - 1) / 2) * width, [v["mean"] for v in values], width,
                    yerr=[v["std"] for v in values], capsize=2, label=ATTACK_NAMES[name])
    ax_ssim.plot(positions, [s["label_only_ssim"]["mean"] for s in results], "k_", markersize=30, mew=2,
                 label="class-mean image (the label alone)")
    ax_ssim.set_ylabel("reconstruction SSIM (lower = more private)")
    ax_ssim.set_ylim(0.3, 1.0)
    figures = (("dcor_v", "dCor V"), ("dcor_v_independent", "dCor V of an independent Z (its bias)"),
               ("dcor_u", "dCor U (bias-corrected)"))
    for i, (key, name) in enumerate(figures):
        ax_dcor.bar(positions + (i - 1) * 0.27, [s[key]["mean"] for s in results], 0.27,
                    yerr=[s[key]["std"] for s in results], capsize=2, label=name)
    ax_dcor.set_ylabel(f"dCor(X, Z), n = {report['splits']['held_out_test']} (lower = more private)")
    ax_dcor.set_ylim(0, 1)
    for ax in (ax_ssim, ax_dcor):
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    ax_ssim.legend(fontsize=7, loc="lower left")
    ax_dcor.legend(fontsize=7, loc="upper right")
    fig.suptitle(wrap_title("verdict: " + report["verdict"]), fontsize=8)
    fig.tight_layout()
    return fig


def reconstructions_figure(report: Dict, examples: Dict, shown: int = 10):
    """Held-out images, the class-mean image of their label, and each setting's strongest reconstruction."""
    plt = headless_pyplot()
    rows = [("original", examples["test_x"]), ("label alone\n(class mean)", examples["class_mean"])]
    rows += [(label, images) for label, images in examples["reconstructions"].items()]
    fig, axes = plt.subplots(len(rows), shown, figsize=(shown * 0.9 + 1.5, len(rows) * 1.0 + 1.2), squeeze=False)
    for row, (label, batch) in enumerate(rows):
        for col in range(shown):
            ax = axes[row][col]
            ax.imshow(batch[col].reshape(IMAGE_SHAPE).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label.replace(", ", ",\n"), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(wrap_title("held-out images as the strongest attacker draws them from Z: the closer a row is to "
                          "'label alone', the more private. Verdict: " + report["verdict"], 90), fontsize=8)
    fig.tight_layout()
    return fig


def write_reconstruction_figures(out_dir: Path, report: Dict, examples: Dict) -> None:
    plt = headless_pyplot()
    for name, figure in (("privacy_utility.png", privacy_utility_figure(report)),
                         ("reconstruction_metrics.png", reconstruction_metrics_figure(report)),
                         ("reconstructions.png", reconstructions_figure(report, examples))):
        figure.savefig(Path(out_dir) / name, dpi=120)
        plt.close(figure)


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
    """Loss-threshold attack ("member if loss ≤ τ") over all τ, ties included.

    advantage = max_τ TPR − FPR, which is the one-sided two-sample Kolmogorov–Smirnov statistic
    D+ of the two loss samples, so `p_value` (scipy's ks_2samp) says whether it beats chance;
    auc = sklearn's roc_auc_score (the probability that a random member's loss is below a random
    non-member's, ties counted ½); tpr_at_1pct_fpr = best TPR with FPR ≤ 0.01;
    loss_gap_bound = ½ + (E_nonmember ℓ − E_member ℓ)/(2B) with ℓ clipped to [0, B]: a lower bound
    on the balanced accuracy of the best threshold attack on the clipped loss (Del Grosso et al. 2021),
    comparable with best_balanced_accuracy = ½ + advantage/2.
    A large advantage with an AUC near ½ is no contradiction: the single best threshold can separate
    a tail (members never reach the high losses some non-members have) while the bulk of the two
    distributions is interleaved.
    """
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score, roc_curve

    if loss_bound <= 0 or not math.isfinite(loss_bound):
        raise ValueError(f"loss_bound must be a positive finite number, got {loss_bound}")
    member = np.clip(np.asarray(member_losses, dtype=np.float64), 0.0, loss_bound)
    nonmember = np.clip(np.asarray(nonmember_losses, dtype=np.float64), 0.0, loss_bound)
    if len(member) == 0 or len(nonmember) == 0:
        raise ValueError("membership attack needs at least one member and one non-member sample")
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    scores = -np.concatenate([member, nonmember])  # low loss ⇒ "member"
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    advantage = float(np.max(tpr - fpr))
    low_fpr = fpr <= 0.01
    return {
        "n_members": int(len(member)),
        "n_nonmembers": int(len(nonmember)),
        "loss_bound": loss_bound,
        "mean_member_loss": float(member.mean()),
        "mean_nonmember_loss": float(nonmember.mean()),
        "advantage": advantage,
        "p_value": float(ks_2samp(member, nonmember, alternative="greater").pvalue),
        "best_balanced_accuracy": 0.5 + advantage / 2,
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": float(tpr[low_fpr].max()) if low_fpr.any() else 0.0,
        "loss_gap_bound": float(0.5 + (nonmember.mean() - member.mean()) / (2 * loss_bound)),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


SIGNIFICANCE = 0.05


def membership_verdict(result: Dict, label: str = "model") -> str:
    figures = (f"advantage {result['advantage']:.3f}, p = {result['p_value']:.2g}; best balanced accuracy "
               f"{result['best_balanced_accuracy']:.3f}, AUC {result['auc']:.3f}")
    if result["p_value"] < SIGNIFICANCE:
        return f"{label}: the loss-threshold attacker tells members from non-members better than chance ({figures})"
    return f"{label}: the loss-threshold attacker does no better than chance ({figures})"


def membership_roc_figure(result: Dict, verdict: str):
    """ROC on a symlog FPR axis (the low-FPR corner matters most) with the true y = x chance line."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"attack: AUC={result['auc']:.3f}, "
                                                                f"adv={result['advantage']:.3f}")
    # y = x sampled densely: two points joined by a straight segment are not y = x on a symlog axis
    chance = np.concatenate([[0.0], np.logspace(-4, 0, 400)])
    ax.plot(chance, chance, color="gray", ls=":", label="chance (y = x): on it = private")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (symlog)")
    ax.set_ylabel("true positive rate")
    ax.text(0.98, 0.03, "above the chance line: members are exposed\ncloser to it = more private",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(wrap_title("verdict: " + verdict, 70), fontsize=7)
    fig.tight_layout()
    return fig


LOSS_FLOOR = 1e-12  # losses below this are drawn in the first bin (a log axis has no 0)


def membership_losses_figure(member_losses: np.ndarray, nonmember_losses: np.ndarray, loss_bound: float,
                             verdict: str):
    """Histograms of per-sample loss on log-spaced bins: confident predictions have losses from
    1e-9 to 1e-2, which linear bins would all put in the first bin."""
    plt = headless_pyplot()
    member = np.clip(member_losses, LOSS_FLOOR, loss_bound)
    nonmember = np.clip(nonmember_losses, LOSS_FLOOR, loss_bound)
    low, high = min(member.min(), nonmember.min()), max(member.max(), nonmember.max())
    bins = np.logspace(np.log10(low), np.log10(max(high, low * 10)), 40)
    fig, ax = plt.subplots(figsize=(6, 4))
    for losses, name in ((member, "members (train)"), (nonmember, "non-members")):
        ax.hist(losses, bins=bins, weights=np.full(len(losses), 1.0 / len(losses)), alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"per-sample loss (log scale, clipped to [{LOSS_FLOOR:g}, B={loss_bound:g}])")
    ax.set_ylabel("fraction of samples")
    ax.text(0.98, 0.97, "the more the two overlap, the more private", transform=ax.transAxes, ha="right",
            va="top", fontsize=7)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(wrap_title("verdict: " + verdict, 80), fontsize=7)
    fig.tight_layout()
    return fig


def membership_audit(model: nn.Module, member_x: torch.Tensor, member_y: torch.Tensor, nonmember_x: torch.Tensor,
                     nonmember_y: torch.Tensor, out_dir: Path, *, loss_bound: float = 10.0,
                     label: str = "model") -> Dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    member_losses = per_sample_losses(model, member_x, member_y)
    nonmember_losses = per_sample_losses(model, nonmember_x, nonmember_y)
    result = membership_attack(member_losses, nonmember_losses, loss_bound=loss_bound)
    verdict = membership_verdict(result, label)
    report = {"audit": "membership", "model": label, "attack": "loss threshold (member if loss <= tau)",
              "verdict": verdict, "member_accuracy": accuracy(model, member_x, member_y),
              "nonmember_accuracy": accuracy(model, nonmember_x, nonmember_y), **result,
              "figures": ["membership_roc.png", "membership_losses.png"]}
    _write_json(out_dir / "membership.json", report)
    plt = headless_pyplot()
    for name, figure in (("membership_roc.png", membership_roc_figure(result, verdict)),
                         ("membership_losses.png",
                          membership_losses_figure(member_losses, nonmember_losses, loss_bound, verdict))):
        figure.savefig(out_dir / name, dpi=120)
        plt.close(figure)
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
