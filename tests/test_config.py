"""The run config: valid examples load, and every kind of mistake names the field and the fix."""
import pytest
import yaml

from swarmtrain.config import load_run_config, parse_run_config
from swarmtrain.errors import UserError
from tests.conftest import REPO, TINY_CONFIG


@pytest.mark.parametrize("path", sorted((REPO / "swarmtrain" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    config = load_run_config(path)
    assert config.target_batch_size > 0


def _tiny():
    return yaml.safe_load(TINY_CONFIG.read_text())


def _error(data) -> str:
    with pytest.raises(UserError) as info:
        parse_run_config(data)
    message = info.value.message
    assert "\n" not in message  # one line
    return message


def test_unknown_field_is_named():
    data = _tiny()
    data["optimizer"]["learning_rate"] = 0.1
    message = _error(data)
    assert "optimizer.learning_rate" in message and "unknown field" in message


def test_missing_field_is_named():
    data = _tiny()
    del data["target_batch_size"]
    assert "target_batch_size: required field is missing" in _error(data)


def test_bad_compression_lists_accepted_forms():
    data = _tiny()
    data["averaging"]["compression"] = "gaussian:0.01"
    message = _error(data)
    assert "averaging.compression" in message
    for form in ("none", "fp16", "topk:RHO", "randomk:RHO", "gaussiank:RHO", "+8bit"):
        assert form in message


@pytest.mark.parametrize("spec", ["gaussiank:0", "gaussiank:1.5", "topk:abc", "fp16+8bit", "topk"])
def test_bad_compression_density(spec):
    data = _tiny()
    data["averaging"]["compression"] = spec
    assert "averaging.compression" in _error(data)


def test_run_id_with_dot_is_refused():
    data = _tiny()
    data["run_id"] = "my.run"
    assert "run_id" in _error(data) and "no dots" in _error(data)


def test_wrong_type_is_named():
    data = _tiny()
    data["target_batch_size"] = "lots"
    assert _error(data).startswith("config: target_batch_size:")


def test_text_source_needs_a_path():
    data = _tiny()
    data["data"] = {"source": "text"}
    assert "data.path is required" in _error(data)


def test_vocab_size_is_not_the_users_to_set():
    data = _tiny()
    data["model"]["config"]["vocab_size"] = 50000
    assert "model.config" in _error(data)


def test_request_timeout_must_be_below_matchmaking_time():
    data = _tiny()
    data["averaging"]["request_timeout"] = 5.0
    assert "request_timeout" in _error(data)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_id: x\nmodel: {kind: gpt2\n")
    with pytest.raises(UserError) as info:
        load_run_config(path)
    assert "not valid YAML at line" in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as info:
        load_run_config(tmp_path / "nope.yaml")
    assert "does not exist" in info.value.message


def test_not_a_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError) as info:
        load_run_config(path)
    assert "expected a mapping" in info.value.message


def test_privacy_section_needs_a_cut_layer():
    data = _tiny()
    data["privacy"] = {"enabled": True, "alpha": 0.5}
    message = _error(data)
    assert message.startswith("config: privacy") and "cut_layer" in message


def test_privacy_head_attaches_at_the_named_layer_of_a_built_model():
    from swarmtrain.models import EMBEDDED_INPUT_LAYER, build_model, compute_loss
    from swarmtrain.privacy import attach_privacy_head

    data = _tiny()
    data["privacy"] = {"enabled": True, "cut_layer": "transformer.h.1", "alpha": 0.5}
    config = parse_run_config(data)
    model = build_model(config.model, config.data.seq_len, config.seed)
    head = attach_privacy_head(model, config.privacy, input_layer=EMBEDDED_INPUT_LAYER["gpt2"])
    import torch

    loss = compute_loss(model, torch.randint(0, 256, (8, config.data.seq_len)), "gpt2")
    total = head.add_penalty(loss)
    assert total.item() > loss.item() and 0.0 < head.last_leakage <= 1.0
