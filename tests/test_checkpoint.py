"""Checkpoints round-trip exactly, and a crash mid-write leaves no checkpoint that looks whole."""
import pytest
import torch

from swarmtrain import checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    shared = torch.randn(4, 3)
    return {"a": torch.randn(5), "tied.1": shared, "tied.2": shared, "t": torch.randn(3, 4).t()}


def test_round_trip(tmp_path):
    state = _state()
    optimizer_state = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}
    path = ckpt.save_checkpoint(tmp_path, 7, state, optimizer_state, meta={"run_id": "r"})
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.path == path and loaded.epoch == 7 and loaded.meta["run_id"] == "r"
    for name, tensor in state.items():
        assert torch.equal(loaded.model_state[name], tensor)
    assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], torch.ones(2))


def test_keeps_last_n(tmp_path):
    for epoch in range(5):
        ckpt.save_checkpoint(tmp_path, epoch, _state(), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-00000003", "epoch-00000004"]


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state())

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, _state(), optimizer_state={"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-00000001"]  # no staging debris either
    assert ckpt.load_checkpoint(tmp_path).epoch == 1


def test_empty_directory(tmp_path):
    assert ckpt.latest_checkpoint_path(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path)
