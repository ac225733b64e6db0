"""Membership-inference audit, the `audit` CLI's error handling, and (slow) the reconstruction audit."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from swarmtrain.privacy.audits import (membership_attack, membership_losses_figure, membership_roc_figure,
                                       membership_verdict, privacy_utility_figure, reconstruction_metrics_figure,
                                       reconstructions_figure)
from swarmtrain.privacy.cli import audit, parse_alphas, parse_seeds


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The audit group sets torch's thread count for its process; don't leak that into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_membership_attack_metrics_on_known_distributions():
    rng = np.random.default_rng(0)
    separated = membership_attack(rng.uniform(0, 1, 500), rng.uniform(2, 3, 500), loss_bound=10)
    assert separated["advantage"] == pytest.approx(1.0)
    assert separated["auc"] == pytest.approx(1.0)
    assert separated["tpr_at_1pct_fpr"] == pytest.approx(1.0)
    # ½ + (E_test ℓ − E_train ℓ)/(2B) = ½ + (2.5 − 0.5)/20
    assert separated["loss_gap_bound"] == pytest.approx(0.6, abs=0.01)
    assert separated["best_balanced_accuracy"] >= separated["loss_gap_bound"]

    same = membership_attack(rng.exponential(1, 2000), rng.exponential(1, 2000), loss_bound=10)
    assert same["auc"] == pytest.approx(0.5, abs=0.04)
    assert same["advantage"] < 0.08
    assert same["loss_gap_bound"] == pytest.approx(0.5, abs=0.01)

    # clipping to B: a huge outlier loss cannot move the bound beyond what B allows
    clipped = membership_attack(np.zeros(10), np.full(10, 1e6), loss_bound=2.0)
    assert clipped["loss_gap_bound"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss_bound"):
        membership_attack(np.zeros(3), np.zeros(3), loss_bound=0)


def _overfit_like_losses():
    """Losses shaped like an overfit digits model's (the `audit train-target` default): members all in
    [1e-8, 3e-3]; non-members mostly as small, a quarter larger, a few misclassified up to ~20."""
    rng = np.random.default_rng(0)
    members = 10 ** rng.uniform(-8, -2.5, 200)
    nonmembers = np.concatenate([10 ** rng.uniform(-8.3, -2.5, 150), 10 ** rng.uniform(-2.5, 0, 37),
                                 rng.uniform(1, 21, 13)])
    return members, nonmembers


def test_auc_and_roc_agree_with_sklearn_on_the_same_scores_ties_included():
    """Issue #17: AUC 0.530 next to advantage 0.245 looked inconsistent. Both are right: checked here
    against sklearn and a direct count on scores with many ties (losses clipped to B, and rounded)."""
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score, roc_curve

    members, nonmembers = _overfit_like_losses()
    for member, nonmember, bound in ((members, nonmembers, 10.0),           # ties at the clip value B
                                     (np.round(members, 3), np.round(nonmembers, 3), 10.0),  # ties everywhere
                                     (members, nonmembers, 1e-3)):           # most scores tied at B
        result = membership_attack(member, nonmember, loss_bound=bound)
        m, n = np.clip(member, 0, bound), np.clip(nonmember, 0, bound)
        labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
        scores = -np.r_[m, n]
        assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        # the AUC's meaning, counted directly: P(member loss < non-member loss) + ½ P(tie)
        counted = ((m[:, None] < n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()) / (len(m) * len(n))
        assert result["auc"] == pytest.approx(counted, abs=1e-12)
        # the advantage is the best threshold's TPR − FPR: every distinct loss tried as "member if ≤ τ"
        thresholds = np.unique(np.r_[m, n])
        best = max((m <= t).mean() - (n <= t).mean() for t in thresholds)
        assert result["advantage"] == pytest.approx(max(best, 0.0), abs=1e-12)
        assert result["advantage"] == pytest.approx(ks_2samp(m, n, alternative="greater").statistic, abs=1e-12)
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        assert result["roc"]["fpr"] == pytest.approx(fpr.tolist()) and result["roc"]["tpr"] == pytest.approx(tpr.tolist())
    # the overfit shape: members exposed through the tail (significant advantage), AUC near ½
    overfit = membership_attack(members, nonmembers, loss_bound=10.0)
    assert overfit["advantage"] > 0.2 and overfit["p_value"] < 1e-3 and abs(overfit["auc"] - 0.5) < 0.1
    assert "better than chance" in membership_verdict(overfit)


def _display_y_on_polyline(ax, line, x_data: float) -> float:
    """Where the drawn polyline passes in display space at the display x of x_data."""
    points = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
    target = ax.transData.transform((x_data, 0.0))[0]
    return float(np.interp(target, points[:, 0], points[:, 1]))


def test_roc_plot_chance_line_is_y_equals_x_on_the_symlog_axis():
    members, nonmembers = _overfit_like_losses()
    result = membership_attack(members, nonmembers, loss_bound=10.0)
    figure = membership_roc_figure(result, membership_verdict(result))
    ax = figure.axes[0]
    chance = next(line for line in ax.get_lines() if line.get_label().startswith("chance"))
    figure.canvas.draw()
    for x in (0.003, 0.02, 0.1, 0.5):  # a straight segment (0,0)-(1,1) misses y = x at all of these
        expected = ax.transData.transform((x, x))[1]
        assert _display_y_on_polyline(ax, chance, x) == pytest.approx(expected, abs=1.0), x
    texts = [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]
    assert any("more private" in t for t in texts) and any("verdict:" in t for t in texts)


def test_loss_histogram_spreads_confident_losses_over_many_bins():
    members, nonmembers = _overfit_like_losses()
    result = membership_attack(members, nonmembers, loss_bound=10.0)
    figure = membership_losses_figure(members, nonmembers, 10.0, membership_verdict(result))
    heights = [patch.get_height() for patch in figure.axes[0].patches]  # fraction of each group per bin
    assert max(heights) < 0.5  # linear bins on [0, B] put ~95% of each group into the first bin
    assert sum(h > 0 for h in heights) >= 20
    texts = [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]
    assert any("more private" in t for t in texts) and any("verdict:" in t for t in texts)


def _fake_reconstruction_report():
    def spread(mean, std=0.01):
        return {"mean": mean, "std": std}

    def setting(name, accuracy, ssim, dcor):
        return {"setting": name, "test_accuracy": spread(accuracy), "reconstruction_ssim": spread(ssim),
                "dcor_u": spread(dcor), "dcor_v": spread(dcor + 0.05), "dcor_v_independent": spread(0.2),
                "label_only_ssim": spread(0.79), "attacks": {"decoder": spread(ssim), "knn": spread(ssim - 0.02)}}

    return {"verdict": "α=3, noise σ=1: the attacker reconstructs no better than from the label alone (test)",
            "splits": {"held_out_test": 447},
            "results": [setting("no defence", 0.975, 0.93, 0.92), setting("α=3, noise σ=1", 0.96, 0.78, 0.45)]}


def test_every_reconstruction_figure_states_the_verdict_and_which_way_is_more_private():
    report = _fake_reconstruction_report()
    images = torch.rand(10, 64)
    examples = {"test_x": images, "class_mean": images, "reconstructions": {"no defence": images,
                                                                            "α=3, noise σ=1": images}}
    for figure in (privacy_utility_figure(report), reconstruction_metrics_figure(report),
                   reconstructions_figure(report, examples)):
        texts = " ".join(t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")))
        assert "no better than from the label alone (test)" in texts.replace("\n", " ")
        assert "more private" in texts


def test_membership_audit_ranks_overfit_model_above_regularized(tmp_path):
    runner = CliRunner()
    targets = {
        "overfit": ["--epochs", "200"],
        "regularized": ["--epochs", "15", "--weight-decay", "0.5", "--label-smoothing", "0.1"],
    }
    reports = {}
    for name, options in targets.items():
        checkpoint = tmp_path / f"{name}.pt"
        result = runner.invoke(audit, ["train-target", "--out", str(checkpoint), "--n-members", "150", *options])
        assert result.exit_code == 0, result.output
        out = tmp_path / name
        result = runner.invoke(audit, ["membership", "--checkpoint", str(checkpoint), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "advantage" in result.output
        report = json.loads((out / "membership.json").read_text())
        assert f"verdict: {report['verdict']}" in result.output and "\n" not in report["verdict"]
        reports[name] = report
        assert (out / "membership_roc.png").stat().st_size > 0 and (out / "membership_losses.png").stat().st_size > 0
    overfit, regularized = reports["overfit"], reports["regularized"]
    print({name: {k: round(r[k], 4) for k in ("advantage", "auc", "tpr_at_1pct_fpr", "loss_gap_bound",
                                                 "member_accuracy", "nonmember_accuracy")}
           for name, r in reports.items()})
    assert overfit["member_accuracy"] == 1.0
    assert overfit["advantage"] > regularized["advantage"] + 0.05
    assert "better than chance" in overfit["verdict"] and overfit["p_value"] < 0.05
    assert overfit["loss_gap_bound"] > regularized["loss_gap_bound"]


def test_membership_accepts_npz_data_overrides(tmp_path):
    runner = CliRunner()
    checkpoint = tmp_path / "model.pt"
    assert runner.invoke(audit, ["train-target", "--out", str(checkpoint), "--n-members", "20", "--epochs", "2"]).exit_code == 0
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "held_out.npz", x=x[-30:] / 16.0, y=y[-30:])
    result = runner.invoke(audit, ["membership", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                                   "--nonmembers", str(tmp_path / "held_out.npz")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "membership.json").read_text())["n_nonmembers"] == 30


@pytest.mark.parametrize("alphas, message", [
    ("0,abc", "'abc' is not a number"),
    ("0,-1", "finite number ≥ 0"),
    ("0,nan", "finite number ≥ 0"),
    ("1,1", "listed twice"),
    ("", "at least one"),
])
def test_bad_alpha_lists_give_one_clear_line(alphas, message):
    with pytest.raises(ValueError, match=message):
        parse_alphas(alphas)
    result = CliRunner().invoke(audit, ["reconstruction", "--alphas", alphas, "--out", "unused"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # click handled it: no traceback for the user


@pytest.mark.parametrize("seeds, message", [("0,x", "'x' is not an integer"), ("1,1", "listed twice"),
                                           ("-1", "negative")])
def test_bad_seed_lists_give_one_clear_line(seeds, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(seeds)
    result = CliRunner().invoke(audit, ["reconstruction", "--seeds", seeds, "--out", "unused"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_reconstruction_audit_reports_every_attacker_and_a_verdict(tmp_path):
    """A short run of the whole audit (a few epochs: the figures are meaningless, the plumbing is not)."""
    result = CliRunner().invoke(audit, ["reconstruction", "--alphas", "1", "--cut-noise", "0.5", "--seeds", "0",
                                        "--epochs", "3", "--warmup-steps", "14", "--attacker-epochs", "3",
                                        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reconstruction.json").read_text())
    assert f"verdict: {report['verdict']}" in result.output and "\n" not in report["verdict"]
    assert [row["setting"] for row in report["results"]] == ["no defence", "α=1, noise σ=0.5"]
    defended = report["results"][1]
    assert set(defended["attacks"]) == {"decoder", "knn", "whitebox", "label_aware"}
    assert set(report["results"][0]["attacks"]) == {"decoder", "knn", "label_aware"}  # no noise: no white-box
    run = defended["runs"][0]
    assert run["dcor_n"] == 447 and run["strongest"] != "label_aware"
    assert run["reconstruction_ssim"] == max(run["attacks"][a]["ssim"] for a in ("decoder", "knn", "whitebox"))
    # the label-only bar: the leaked set's class-mean image of each held-out sample's label
    from swarmtrain.privacy.audits import reconstruction_quality
    from swarmtrain.privacy.digits import load_digits_splits

    splits = load_digits_splits(seed=0)
    means = torch.stack([splits.leaked_x[splits.leaked_y == c].mean(0) for c in range(10)])
    assert run["label_only"]["class_mean"]["ssim"] == pytest.approx(
        reconstruction_quality(means[splits.test_y], splits.test_x)["ssim"])
    assert defended["verdict"].startswith("α=1, noise σ=0.5: the attacker reconstructs")
    for figure in report["figures"]:
        assert (tmp_path / figure).stat().st_size > 10_000


def test_user_mistakes_in_membership_give_clear_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(audit, ["membership", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in missing.output

    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    bad = runner.invoke(audit, ["membership", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "not a readable torch checkpoint" in bad.output
    assert isinstance(bad.exception, SystemExit)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    bad = runner.invoke(audit, ["membership", "--checkpoint", str(foreign), "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "train-target" in bad.output


def test_every_option_is_documented():
    runner = CliRunner()
    for command in ("reconstruction", "membership", "train-target"):
        result = runner.invoke(audit, [command, "--help"])
        assert result.exit_code == 0
        for param in audit.commands[command].params:
            assert param.help, f"{command} {param.name} has no help text"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 2 settings x 3 seeds, 300 epochs each, and their attackers: over 10 min on 2 loaded cores
def test_reconstruction_audit_default_defence_leaks_nothing_beyond_the_label(tmp_path):
    """Issue #17's acceptance, at the default defence (PrivacyConfig's defaults), 3 seeds: accuracy
    within 2 points of no defence and the strongest attacker (white-box included) no better than the
    class-mean image. dCor V ≤ 0.1 is not asserted: no Z can reach it at n = 447 (see BENCHMARKS.md,
    an independent Z scores 0.12-0.43 there); the U statistic must have fallen well below no defence."""
    from swarmtrain.privacy.config import DEFAULT_ALPHA

    result = CliRunner().invoke(audit, ["reconstruction", "--alphas", f"{DEFAULT_ALPHA:g}", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reconstruction.json").read_text())
    plain, default = report["results"]
    print(result.output)
    assert plain["dcor_u"]["mean"] > 0.8 and plain["reconstruction_ssim"]["mean"] > plain["label_only_ssim"]["mean"]
    assert default["accuracy_change"]["mean"] >= -0.02
    assert default["reconstruction_ssim"]["mean"] <= default["label_only_ssim"]["mean"]
    assert "whitebox" in default["attacks"]
    assert default["dcor_u"]["mean"] < plain["dcor_u"]["mean"] - 0.3
    assert report["verdict"] == default["verdict"] and "no better than from the label alone" in report["verdict"]


def test_the_data_owners_leakage_figure_is_the_audits_dcor_u():
    """A split run's data owner reports head.measure() on its held-out data (Z as released, U statistic);
    the audit reports dcor_u from leakage_figures: one estimator, one number."""
    from swarmtrain.privacy.audits import leakage_figures
    from swarmtrain.privacy.config import PrivacyConfig
    from swarmtrain.privacy.digits import DigitsNet, load_digits_splits
    from swarmtrain.privacy.split import owner_privacy_head

    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    bottom = DigitsNet(cut_width=32).features
    head = owner_privacy_head(bottom, PrivacyConfig(enabled=True, split={}), "3", num_classes=10, seed=0)
    with torch.no_grad():
        bottom(splits.test_x)
        owner_figure = head.measure()
    audit_figures = leakage_figures(splits.test_x, head.shared_activation)
    assert owner_figure == pytest.approx(audit_figures["dcor_u"], abs=1e-6)
    assert head.stats.leakage_statistic == "u" and head.stats.batch_size == audit_figures["dcor_n"] == 447
