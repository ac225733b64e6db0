"""Checkpoints round-trip exactly, and a crash mid-write leaves no checkpoint that looks whole."""
import pytest
import torch

from swarmtrain.training import checkpoint as ckpt


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


def _adamw_state(model):
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return optimizer.state_dict()


def test_a_checkpoint_of_another_model_or_optimizer_is_named_as_such():
    from swarmtrain.training.checkpoint import model_state_mismatch, optimizer_state_mismatch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert model_state_mismatch(model.state_dict(), model.state_dict()) is None
    wider = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    assert "another model size" in model_state_mismatch(model.state_dict(), wider.state_dict())
    deeper = torch.nn.Sequential(*model, torch.nn.Linear(2, 2))
    assert "another model" in model_state_mismatch(model.state_dict(), deeper.state_dict())

    state = _adamw_state(model)
    assert optimizer_state_mismatch(state, _adamw_state(model)) is None
    # 8-bit Adam keeps state1/state2 where AdamW keeps exp_avg/exp_avg_sq: loading it breaks the first step
    eight_bit = {"state": {key: {"step": value["step"], "state1": value["exp_avg"], "state2": value["exp_avg_sq"]}
                           for key, value in state["state"].items()},
                 "param_groups": state["param_groups"]}
    assert "another optimizer's" in optimizer_state_mismatch(state, eight_bit)
    assert "other parameter groups" in optimizer_state_mismatch(state, _adamw_state(deeper))
    assert "not readable" in optimizer_state_mismatch(state, {"state": {}})
