"""Data sources and sharding."""
import torch

from swarmtrain.config import DataConfig
from swarmtrain.data import DOC_SEP_ID, MASK_ID, load_corpus, mask_tokens, peer_batches


def _write_corpus(directory, files=40):
    directory.mkdir()
    for i in range(files):
        (directory / f"doc{i}.txt").write_text(f"document {i} " * 50)


def test_text_directory_source(tmp_path):
    _write_corpus(tmp_path / "corpus")
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path / "corpus"), seq_len=32, heldout_fraction=0.1))
    assert corpus.train.shape[1] == 32 and corpus.heldout.shape[0] >= 1
    assert corpus.train.max() <= DOC_SEP_ID and (corpus.train == DOC_SEP_ID).any()


def test_heldout_split_is_by_document_and_deterministic(tmp_path):
    _write_corpus(tmp_path / "corpus")
    config = DataConfig(source="text", path=str(tmp_path / "corpus"), seq_len=32, heldout_fraction=0.1)
    first, second = load_corpus(config), load_corpus(config)
    assert torch.equal(first.heldout, second.heldout) and torch.equal(first.train, second.train)


def test_datasets_directory_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": [f"row {i} " * 40 for i in range(60)]}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(DataConfig(source="datasets", path=str(tmp_path / "ds"), seq_len=32, heldout_fraction=0.1))
    assert corpus.train.shape[0] > 10


def test_stdlib_source_offline():
    corpus = load_corpus(DataConfig(source="stdlib", seq_len=64, max_bytes=300_000))
    assert corpus.train.shape[0] > 1000


def test_peers_see_different_samples(tmp_path):
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
