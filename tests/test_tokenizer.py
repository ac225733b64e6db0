"""Tokenizers: training one offline, round trips, the run's pin (sha256), and refusing another one."""
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from swarmtrain.config import DataConfig, parse_run_config
from swarmtrain.data import load_tokenizer, open_training_data, pin_tokenizer, resolve_tokenizer
from swarmtrain.cli.tokenizer import tokenizer as tokenizer_group
from swarmtrain.data.tokenizer import cached_tokenizer_path, check_tokenizer
from swarmtrain.errors import UserError

SAMPLE = ("The quick brown fox jumps over the lazy dog.\n"
          "def add(a, b):\n    return a + b  # tabs\tand  double  spaces\n"
          "Ünïcödé: naïve café, 東京, emoji 🙂\n")


def _corpus(directory, docs=200):
    directory.mkdir(exist_ok=True)
    for i in range(docs):
        (directory / f"{i}.txt").write_text(f"Document {i} talks about the quick brown fox and the lazy dog. "
                                            f"def add(a, b): return a + b  # number {i}\n" * 5)
    return directory


def train(tmp_path, *extra, vocab=400, out="tok", corpus=None):
    corpus = corpus or _corpus(tmp_path / "corpus")
    return CliRunner().invoke(tokenizer_group, ["train", "--data", str(corpus), "--vocab-size", str(vocab),
                                                "--out", str(tmp_path / out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    result = train(tmp_path)
    assert result.exit_code == 0, result.output
    return tmp_path / "tok"


def test_trained_bpe_tokenizer_round_trips_any_text(trained):
    assert {p.name for p in trained.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    tokenizer = load_tokenizer(str(trained))
    assert tokenizer.vocabulary.size == 400
    ids = tokenizer.encode([SAMPLE])[0]
    assert tokenizer.decode(ids.tolist()) == SAMPLE  # byte-level: exact, even for what it never saw
    assert len(ids) < len(SAMPLE.encode()) * 0.8  # and it did learn merges
    vocabulary = tokenizer.vocabulary
    assert (vocabulary.pad_id, vocabulary.bos_id, vocabulary.separator_id, vocabulary.mask_id) == (0, 2, 3, 4)


def test_transformers_loads_the_trained_tokenizer_the_same(trained):
    from transformers import AutoTokenizer

    ours = load_tokenizer(str(trained / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(str(trained))
    assert theirs(SAMPLE, add_special_tokens=False)["input_ids"] == ours.encode([SAMPLE])[0].tolist()
    assert theirs.mask_token_id == ours.vocabulary.mask_id


def test_unigram_tokenizer_round_trips_its_corpus_text(tmp_path):
    import random

    rng, words = random.Random(0), "the quick brown fox jumps over lazy dog and a cat runs to its house".split()
    corpus = tmp_path / "sentences"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text("".join(" ".join(rng.choices(words, k=20)) + ".\n" for _ in range(100)))
    result = train(tmp_path, "--kind", "unigram", vocab=300, corpus=corpus)
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    text = "the quick brown fox jumps over the lazy dog and a cat runs to its house."
    ids = tokenizer.encode([text])[0]
    assert tokenizer.decode(ids.tolist()) == text and len(ids) < len(text) / 2


def test_streaming_with_a_trained_tokenizer(trained, tmp_path):
    config = DataConfig(source="text", path=str(_corpus(tmp_path / "c")), tokenizer=str(trained), seq_len=16,
                        heldout_blocks=4)
    with open_training_data(config, None, b"peer", max_passes=1) as data:
        blocks = [block for batch in data.batches(8) for block in batch]
    assert data.vocabulary.size == 400 and len(blocks) > 50
    text = data.tokenizer.decode(blocks[0].tolist())
    assert "fox" in text or "dog" in text or "add" in text or "Document" in text


@pytest.mark.parametrize("arguments, message", [
    (["--data", "{tmp}/nowhere", "--vocab-size", "400", "--out", "{tmp}/t"], "--data .*nowhere: no such file"),
    (["--data", "{tmp}/empty", "--vocab-size", "400", "--out", "{tmp}/t"], "the corpus is empty"),
    (["--data", "{tmp}/corpus", "--vocab-size", "100", "--out", "{tmp}/t"], "--vocab-size 100: a bpe tokenizer needs at least 261"),
    (["--data", "{tmp}/corpus", "--vocab-size", "400", "--out", "{tmp}/corpus"], "--out .*corpus: it exists"),
    (["--data", "{tmp}/ds", "--vocab-size", "400", "--out", "{tmp}/t"], "no column 'text' \\(it has body\\)"),
])
def test_bad_input_to_tokenizer_train_is_one_line_and_writes_nothing(tmp_path, arguments, message):
    import datasets

    _corpus(tmp_path / "corpus", docs=5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    datasets.Dataset.from_dict({"body": ["text"] * 4}).save_to_disk(str(tmp_path / "ds"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(tokenizer_group, ["train", *[a.format(tmp=tmp_path) for a in arguments]])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert __import__("re").search(message, lines[0]), lines[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no output, no staging directory left


def test_a_peer_with_a_different_tokenizer_file_is_refused_in_one_line(trained, tmp_path):
    result = train(tmp_path, vocab=300, out="other")
    assert result.exit_code == 0, result.output
    run = parse_run_config({"run_id": "r", "model": {"kind": "gpt2"}, "target_batch_size": 8,
                            "data": {"tokenizer": str(trained)}})
    pinned, tokenizer = pin_tokenizer(run)
    assert pinned.data.tokenizer_sha256 == tokenizer.sha256 and pinned.data.vocab_size == 400
    # what a peer receives: the published config, with the organiser's path and the pin
    published = parse_run_config(pinned.model_dump(mode="json"))
    assert resolve_tokenizer(published.data).sha256 == tokenizer.sha256  # same file: fine
    elsewhere = published.data.model_copy(update={"tokenizer": str(tmp_path / "other")})
    with pytest.raises(UserError) as error:
        resolve_tokenizer(elsewhere)
    message = error.value.message
    assert "\n" not in message and "is not the run's" in message and tokenizer.sha256[:16] in message
    with pytest.raises(UserError, match="is not the run's"):
        open_training_data(elsewhere, None, b"peer")
    with pytest.raises(UserError, match="not bytes"):
        check_tokenizer(published.data, load_tokenizer("bytes"))


def test_a_peer_without_the_file_gets_it_from_the_swarm_once(trained, tmp_path):
    content = (trained / "tokenizer.json").read_bytes()
    pinned, tokenizer = pin_tokenizer(parse_run_config({"run_id": "r", "model": {"kind": "gpt2"},
                                                        "target_batch_size": 8, "data": {"tokenizer": str(trained)}}))
    volunteer = pinned.data.model_copy(update={"tokenizer": "/organisers/machine/tok"})
    asked = []

    def fetch(sha256):
        asked.append(sha256)
        return content

    cache = tmp_path / "cache"
    assert resolve_tokenizer(volunteer, fetch=fetch, cache_dir=cache).sha256 == tokenizer.sha256
    assert resolve_tokenizer(volunteer, fetch=fetch, cache_dir=cache).sha256 == tokenizer.sha256
    assert asked == [tokenizer.sha256]  # the second start found it in the cache
    assert cached_tokenizer_path(tokenizer.sha256, cache).read_bytes() == content
    with pytest.raises(UserError, match="does not match the run's sha256"):
        resolve_tokenizer(volunteer, fetch=lambda sha: content + b" ", cache_dir=tmp_path / "other-cache")
    with pytest.raises(UserError, match="not on this machine"):
        resolve_tokenizer(volunteer, cache_dir=tmp_path / "empty-cache")


def test_config_pins_are_checked(trained):
    with pytest.raises(UserError, match="tokenizer_sha256 is for a tokenizer file"):
        parse_run_config({"run_id": "r", "model": {"kind": "gpt2"}, "target_batch_size": 8,
                          "data": {"tokenizer_sha256": "0" * 64}})
    wrong = parse_run_config({"run_id": "r", "model": {"kind": "gpt2"}, "target_batch_size": 8,
                              "data": {"tokenizer": str(trained), "tokenizer_sha256": "0" * 64}})
    with pytest.raises(UserError, match="is not the run's"):
        pin_tokenizer(wrong)  # the organiser pinned one file and points at another


def test_a_missing_tokenizer_is_one_line(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer .*nowhere/tokenizer.json: no such file or directory"):
        load_tokenizer(str(tmp_path / "nowhere" / "tokenizer.json"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="the directory has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "dir"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a tokenizers file"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_a_hub_name_offline_is_one_line():
    script = ("from swarmtrain.data import load_tokenizer\n"
              "from swarmtrain.errors import UserError\n"
              "try:\n    load_tokenizer('someone/some-tokenizer')\n"
              "except UserError as error:\n    print(error.message)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "fetching it from the Hugging Face hub failed" in lines[0], result.stdout + result.stderr


def test_tokenizer_info(trained):
    result = CliRunner().invoke(tokenizer_group, ["info", str(trained)])
    assert result.exit_code == 0 and "vocab size 400" in result.output
    assert load_tokenizer(str(trained)).sha256 in result.output
