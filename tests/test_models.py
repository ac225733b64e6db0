"""Models from transformers configs: gpt2 / albert as before, any causal or masked LM with kind: auto,
the vocabulary always from the run's tokenizer, and one line for every mismatch."""
import json

import pytest
import torch
from click.testing import CliRunner

from swarmtrain.config import DataConfig, parse_run_config
from swarmtrain.data import BYTE_VOCABULARY, VOCAB_SIZE, load_tokenizer, open_training_data
from swarmtrain.cli.tokenizer import tokenizer as tokenizer_group
from swarmtrain.errors import UserError
from swarmtrain.models import (build_model, check_model, compute_loss, embedded_input_layer, heldout_loss,
                               objective_of)

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2}
BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny models train in ~1 s on one thread; on a busy machine two spinning OpenMP threads take 50x longer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(**model):
    return parse_run_config({"run_id": "r", "target_batch_size": 8, "model": model}).model


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    corpus = root / "corpus"
    corpus.mkdir()
    words = "the cat sat on a mat while the dog ran to its house and the bird flew over a tree".split()
    for i in range(40):
        (corpus / f"{i}.txt").write_text("".join(" ".join(words[(i + j + k) % len(words)] for k in range(12)) + ".\n"
                                                 for j in range(60)))
    result = CliRunner().invoke(tokenizer_group, ["train", "--data", str(corpus), "--vocab-size", "300",
                                                  "--out", str(root / "tok")])
    assert result.exit_code == 0, result.output
    return corpus, root / "tok"


def test_gpt2_and_albert_keep_the_byte_vocabulary():
    gpt2 = build_model(model_config(kind="gpt2", config={"n_layer": 1, "n_head": 2, "n_embd": 16}), 32, 0)
    assert gpt2.config.vocab_size == VOCAB_SIZE and gpt2.config.eos_token_id == BYTE_VOCABULARY.pad_id
    albert = build_model(model_config(kind="albert", config={"hidden_size": 16, "num_attention_heads": 2,
                                                             "intermediate_size": 32, "embedding_size": 8}), 32, 0)
    assert albert.config.vocab_size == VOCAB_SIZE and albert.config.pad_token_id == BYTE_VOCABULARY.pad_id
    again = build_model(model_config(kind="gpt2", config={"n_layer": 1, "n_head": 2, "n_embd": 16}), 32, 0,
                        BYTE_VOCABULARY)
    assert all(torch.equal(a, b) for a, b in zip(gpt2.state_dict().values(), again.state_dict().values()))


def test_objectives():
    assert objective_of(model_config(kind="auto", model_type="llama")) == "causal"
    assert objective_of(model_config(kind="auto", model_type="bert")) == "masked"
    assert objective_of(model_config(kind="auto", model_type="bert", objective="causal")) == "causal"
    assert objective_of(model_config(kind="gpt2")) == "causal" and objective_of(model_config(kind="albert")) == "masked"


@pytest.mark.parametrize("model_type, fields, layer", [
    ("llama", LLAMA, "model.layers.0"),
    ("gpt_neox", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
     "gpt_neox.layers.0"),
    ("bert", BERT, "bert.encoder.layer.0"),
])
def test_auto_models_train_on_the_stream_with_the_tokenizers_vocabulary(corpus_and_tokenizer, model_type, fields, layer):
    corpus, tokenizer_dir = corpus_and_tokenizer
    config = model_config(kind="auto", model_type=model_type, config=fields)
    data_config = DataConfig(source="text", path=str(corpus), tokenizer=str(tokenizer_dir), seq_len=32,
                             heldout_blocks=8)
    with open_training_data(data_config, None, b"peer") as data:
        model = build_model(config, data_config.seq_len, 0, data.vocabulary)
        assert model.config.vocab_size == data.vocabulary.size == 300
        assert embedded_input_layer(model, config.kind) == layer
        assert dict(model.named_modules())[layer] is not None
        objective = objective_of(config)
        before = heldout_loss(model, data.heldout, objective, vocabulary=data.vocabulary)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        stream = data.batches(16)
        for _ in range(40):
            loss = compute_loss(model, next(stream), objective, generator, data.vocabulary)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = heldout_loss(model, data.heldout, objective, vocabulary=data.vocabulary)
    assert after < before - 0.5, (before, after)
    same = build_model(config, data_config.seq_len, 0, data.vocabulary)
    fresh = build_model(config, data_config.seq_len, 0, data.vocabulary)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), fresh.state_dict().values()))


def test_a_local_config_json_is_read_into_the_run_config(tmp_path, corpus_and_tokenizer):
    _, tokenizer_dir = corpus_and_tokenizer
    vocabulary = load_tokenizer(str(tokenizer_dir)).vocabulary
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                "transformers_version": "4.0", "torch_dtype": "bfloat16", **LLAMA}))
    config = model_config(kind="auto", config_file=str(path), config={"num_hidden_layers": 1})
    assert config.model_type == "llama" and config.config_file is None  # complete without the file
    assert config.config["num_hidden_layers"] == 1 and "architectures" not in config.config
    assert check_model(config, 32, vocabulary) > 0
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, **LLAMA}))
    with pytest.raises(UserError) as error:
        check_model(model_config(kind="auto", config_file=str(path)), 32, vocabulary)
    assert "\n" not in error.value.message
    assert "vocab_size is 32000 but the tokenizer (data.tokenizer) has 300 tokens" in error.value.message


@pytest.mark.parametrize("model, message", [
    ({"kind": "auto"}, "model: .*kind: auto needs model_type"),
    ({"kind": "auto", "model_type": "lama"}, "model: .*model_type 'lama' is not a transformers model type"),
    ({"kind": "gpt2", "model_type": "llama"}, "model_type applies to kind: auto only"),
    ({"kind": "auto", "config_file": "/no/such/config.json"}, "config_file /no/such/config.json: no such file"),
    ({"kind": "gpt2", "config": {"vocab_size": 5}}, "remove vocab_size"),
])
def test_bad_model_sections_are_one_line(model, message):
    with pytest.raises(UserError, match=message) as error:
        parse_run_config({"run_id": "r", "target_batch_size": 8, "model": model})
    assert "\n" not in error.value.message


def test_model_and_tokenizer_mismatches_are_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    causal_only = Tokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    causal_only.save(str(tmp_path / "tokenizer.json"))
    vocabulary = load_tokenizer(str(tmp_path)).vocabulary
    assert vocabulary.mask_id is None and vocabulary.separator_id == 2
    with pytest.raises(UserError, match="has no mask token .* which a masked LM needs"):
        check_model(model_config(kind="auto", model_type="bert", config=BERT), 32, vocabulary)
    assert check_model(model_config(kind="auto", model_type="llama", config=LLAMA), 32, vocabulary) > 0
    with pytest.raises(UserError, match="allows 16 positions but data.seq_len is 32"):
        check_model(model_config(kind="auto", model_type="bert", config={**BERT, "max_position_embeddings": 16}), 32,
                    BYTE_VOCABULARY)
    with pytest.raises(UserError, match="has no causal LM head"):
        check_model(model_config(kind="auto", model_type="albert", objective="causal"), 32, BYTE_VOCABULARY)


@pytest.mark.parametrize("name", ["pretrain-albert.yaml", "pretrain-llama.yaml"])
def test_realistic_configs_run_as_written_on_the_organisers_corpus_and_tokenizer(name, tmp_path, monkeypatch,
                                                                                  corpus_and_tokenizer):
    """The two commands of the README (corpus, then tokenizer), then the config as it is."""
    from pathlib import Path

    from swarmtrain.config import load_run_config
    from swarmtrain.data import pin_tokenizer

    corpus, tokenizer_dir = corpus_and_tokenizer
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus").symlink_to(corpus)
    (tmp_path / "data" / "tokenizer").symlink_to(tokenizer_dir)
    config = load_run_config(Path(__file__).parent.parent / "configs" / name)
    pinned, tokenizer = pin_tokenizer(config)  # what the coordinator publishes
    assert pinned.data.tokenizer_sha256 == tokenizer.sha256 and pinned.data.vocab_size == 300
    parameters = check_model(pinned.model, pinned.data.seq_len, tokenizer.vocabulary)
    assert 5e6 < parameters < 60e6  # ALBERT-base shares its layers: ~7M with this small vocabulary
    small = pinned.data.model_copy(update={"seq_len": 64})  # the corpus here is too small for 512-token blocks
    with open_training_data(small, None, b"peer", tokenizer=tokenizer) as data:
        assert next(data.batches(4)).max() < tokenizer.vocabulary.size


def test_a_model_is_sized_from_the_published_config_alone(corpus_and_tokenizer):
    """What `swarmtrain doctor` can do with the run config from the swarm and no tokenizer file."""
    from swarmtrain.data import pin_tokenizer, pinned_vocabulary

    _, tokenizer_dir = corpus_and_tokenizer
    run = parse_run_config({"run_id": "r", "target_batch_size": 8, "data": {"tokenizer": str(tokenizer_dir)},
                            "model": {"kind": "auto", "model_type": "bert", "config": BERT}})
    pinned, tokenizer = pin_tokenizer(run)
    published = parse_run_config(pinned.model_dump(mode="json"))
    assert check_model(published.model, 32, pinned_vocabulary(published.data)) == \
        check_model(published.model, 32, tokenizer.vocabulary)
