"""Data sources (text files, stdlib, saved and streamed datasets), their shards, and bad input."""
import json

import pytest
import torch

from swarmtrain.config import DataConfig
from swarmtrain.data import DOC_SEP_ID, MASK_ID, load_corpus, mask_tokens, open_training_data, peer_batches
from swarmtrain.data.sources import open_source
from swarmtrain.errors import UserError


def write_corpus(directory, files=40, repeat=50):
    directory.mkdir()
    for i in range(files):
        (directory / f"doc{i}.txt").write_text(f"document {i} " * repeat)
    return directory


def _all_text(source):
    return b"".join(s.content if isinstance(s.content, bytes) else s.content.encode()
                    for unit in range(source.num_units) for s in source.read(unit))


def test_text_shards_partition_the_files_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"line {i} of a long file: " + "x" * (i % 97) + "\n" for i in range(3000)]
    (corpus / "big.txt").write_text("".join(lines))
    (corpus / "small.txt").write_text("no newline at the end")
    (corpus / "empty.txt").write_text("")
    source = open_source(DataConfig(source="text", path=str(corpus), seq_len=8, shard_bytes=4096))
    assert source.num_units > 20  # one big file becomes many shards
    expected = b"".join((corpus / name).read_bytes() for name in ("big.txt", "empty.txt", "small.txt"))
    assert _all_text(source) == expected  # nothing lost, nothing read twice
    for unit in range(1, source.num_units):  # shards start at line starts
        first = next(source.read(unit), None)
        assert first is None or first.content.startswith((b"line", b"no newline"))
    ends = [s for unit in range(source.num_units) for s in source.read(unit) if s.ends_document]
    assert len(ends) == 2  # one document end per non-empty file


def test_a_shard_resumes_at_a_segment(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"{i} " * 30 + "\n" for i in range(4000)))
    source = open_source(DataConfig(source="text", path=str(corpus), seq_len=8, shard_bytes=200_000, num_shards=1))
    segments = list(source.read(0))
    assert len(segments) > 3
    assert [s.content for s in source.read(0, start=3)] == [s.content for s in segments[3:]]


def test_text_directory_source(tmp_path):
    write_corpus(tmp_path / "corpus")
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path / "corpus"), seq_len=32, heldout_blocks=8))
    assert corpus.train.shape[1] == 32 and corpus.heldout.shape == (8, 32)
    assert corpus.train.max() <= DOC_SEP_ID and (corpus.train == DOC_SEP_ID).any()


def test_load_corpus_is_deterministic(tmp_path):
    write_corpus(tmp_path / "corpus")
    config = DataConfig(source="text", path=str(tmp_path / "corpus"), seq_len=32, heldout_blocks=8)
    first, second = load_corpus(config), load_corpus(config)
    assert torch.equal(first.heldout, second.heldout) and torch.equal(first.train, second.train)


def test_saved_dataset_source(tmp_path):
    import datasets

    rows = [f"row {i} " * 40 for i in range(60)]
    datasets.Dataset.from_dict({"text": rows, "id": list(range(60))}).save_to_disk(str(tmp_path / "ds"))
    source = open_source(DataConfig(source="datasets", path=str(tmp_path / "ds"), seq_len=32))
    assert source.num_units > 1
    texts = [s.content for unit in range(source.num_units) for s in source.read(unit)]
    assert texts == rows
    corpus = load_corpus(DataConfig(source="datasets", path=str(tmp_path / "ds"), seq_len=32, heldout_blocks=4))
    assert corpus.train.shape[0] > 10


def test_saved_dataset_dict_uses_the_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train text " * 30] * 20}),
                          "test": datasets.Dataset.from_dict({"text": ["test text " * 30] * 20})}
                         ).save_to_disk(str(tmp_path / "dd"))
    train = open_source(DataConfig(source="datasets", path=str(tmp_path / "dd"), seq_len=8))
    assert next(train.read(0)).content.startswith("train")
    test = open_source(DataConfig(source="datasets", path=str(tmp_path / "dd"), split="test", seq_len=8))
    assert next(test.read(0)).content.startswith("test")
    with pytest.raises(UserError, match="no split 'validation'.*data.split"):
        open_source(DataConfig(source="datasets", path=str(tmp_path / "dd"), split="validation", seq_len=8))


def test_directory_of_data_files_is_streamed_by_file(tmp_path):
    directory = tmp_path / "jsonl"
    directory.mkdir()
    for part in range(4):
        with open(directory / f"part-{part}.jsonl", "w") as handle:
            for row in range(50):
                handle.write(json.dumps({"text": f"part {part} row {row} " * 10, "n": row}) + "\n")
    source = open_source(DataConfig(source="datasets", path=str(directory), seq_len=8))
    assert source.num_units == 4
    rows = [s.content for s in source.read(2)]
    assert len(rows) == 50 and rows[0].startswith("part 2 row 0 ")
    assert [s.content for s in source.read(2, start=45)] == rows[45:]  # resumes inside a file
    with open_training_data(DataConfig(source="datasets", path=str(directory), seq_len=16, heldout_blocks=4),
                            None, b"peer", max_passes=1) as data:
        assert sum(len(batch) for batch in data.batches(1)) > 100


def test_stdlib_source_offline():
    corpus = load_corpus(DataConfig(source="stdlib", seq_len=64, max_bytes=300_000))
    assert corpus.train.shape[0] > 3000


def test_peers_see_different_samples():
    corpus = load_corpus(DataConfig(source="stdlib", seq_len=64, max_bytes=300_000))
    first = [next(peer_batches(corpus, 16, 8, seed)) for seed in (1, 2)]
    assert not torch.equal(first[0], first[1])
    again = next(peer_batches(corpus, 16, 8, 1))
    assert torch.equal(first[0], again)  # a peer's order is reproducible from its seed


def test_masking_for_masked_lm():
    ids = torch.randint(0, 256, (64, 128))
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(0))
    predicted = labels != -100
    assert 0.12 < predicted.float().mean() < 0.18
    assert torch.equal(labels[predicted], ids[predicted])
    assert (inputs[predicted] == MASK_ID).float().mean() > 0.7
    assert torch.equal(inputs[~predicted], ids[~predicted])


@pytest.mark.parametrize("make, config_fields, message", [
    (lambda tmp: None, {"source": "text", "path": "{tmp}/nowhere"}, "data.path .*/nowhere: no such file or directory"),
    (lambda tmp: (tmp / "empty").mkdir(), {"source": "text", "path": "{tmp}/empty"}, "no such file|is empty"),
    (lambda tmp: ((tmp / "blank").mkdir(), (tmp / "blank" / "a.txt").write_text("")),
     {"source": "text", "path": "{tmp}/blank"}, "the corpus is empty"),
    (lambda tmp: __import__("datasets").Dataset.from_dict({"content": ["some text"] * 10}).save_to_disk(str(tmp / "ds")),
     {"source": "datasets", "path": "{tmp}/ds"}, "no column 'text' \\(it has content\\); set data.text_column"),
    (lambda tmp: (tmp / "tiny.txt").write_text("too short"), {"source": "text", "path": "{tmp}/tiny.txt", "seq_len": 64},
     "too small for data.seq_len=64"),
])
def test_bad_corpus_is_one_line(tmp_path, make, config_fields, message):
    make(tmp_path)
    fields = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in config_fields.items()}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message) as error:
        open_training_data(DataConfig(**fields), None, b"peer")
    assert "\n" not in str(error.value.message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_peer_data_flag_is_named_in_errors(tmp_path):
    with pytest.raises(UserError, match="^--data .*: no such file"):
        open_training_data(DataConfig(), str(tmp_path / "missing"), b"peer")
