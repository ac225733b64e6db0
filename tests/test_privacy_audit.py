"""Membership-inference audit, the `audit` CLI's error handling, and (slow) the reconstruction audit."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from swarmtrain.privacy.audits import membership_attack
from swarmtrain.privacy.cli import audit, parse_alphas


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
        reports[name] = json.loads((out / "membership.json").read_text())
        assert (out / "membership_roc.png").stat().st_size > 0 and (out / "membership_losses.png").stat().st_size > 0
    overfit, regularized = reports["overfit"], reports["regularized"]
    print({name: {k: round(r[k], 4) for k in ("advantage", "auc", "tpr_at_1pct_fpr", "loss_gap_bound",
                                                 "member_accuracy", "nonmember_accuracy")}
           for name, r in reports.items()})
    assert overfit["member_accuracy"] == 1.0
    assert overfit["advantage"] > regularized["advantage"] + 0.05
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
def test_reconstruction_audit_nopeek_cuts_leakage_and_breaks_inversion(tmp_path):
    """Acceptance: dCor(X, Z) ≤ 0.3 at α=3 with accuracy within 3 points of α=0; inversion degrades."""
    result = CliRunner().invoke(audit, ["reconstruction", "--alphas", "0,3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reconstruction.json").read_text())
    by_alpha = {row["alpha"]: row for row in report["results"]}
    plain, private = by_alpha[0.0], by_alpha[3.0]
    print(json.dumps(report["results"], indent=1), report["class_mean_baseline"])
    assert plain["dcor_v"] > 0.8  # without NoPeek, Z nearly determines X's distance structure
    assert private["dcor_v"] <= 0.3 and private["dcor_u"] <= 0.3
    assert private["test_accuracy"] >= plain["test_accuracy"] - 0.03
    # the attacker's inverse network does clearly worse on the private model ...
    assert private["reconstruction_mse"] > 2 * plain["reconstruction_mse"]
    assert private["reconstruction_ssim"] < plain["reconstruction_ssim"] - 0.08
    # ... and has lost most (≥ 70%) of its edge over an attacker who only knows the label
    label_only_mse = report["class_mean_baseline"]["reconstruction_mse"]
    assert (private["reconstruction_mse"] - plain["reconstruction_mse"]) >= 0.7 * (label_only_mse - plain["reconstruction_mse"])
    for figure in report["figures"]:
        assert (tmp_path / figure).stat().st_size > 10_000
