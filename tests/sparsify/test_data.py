import json

import pytest
import torch
from conftest import make_corpus

from sparsify.config import DataConfig
from sparsify.data import iter_batches, iter_sequences, local_token_stream
from sparsify.errors import DataError


@pytest.fixture()
def tokenizer(tiny_bridge):
    return tiny_bridge.tokenizer


def test_text_files_are_joined_with_eos_and_chunked(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the state of the union")
    (tmp_path / "b.txt").write_text("is strong")
    data = DataConfig(files=[str(tmp_path / "*.txt")], split="all", n_ctx=4)
    stream = local_token_stream(data, tokenizer)
    expected = (
        tokenizer("the state of the union", add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        + tokenizer("is strong", add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )
    assert stream.tolist() == expected
    sequences = list(iter_sequences(data, tokenizer))
    assert len(sequences) == len(expected) // 4
    assert sorted(map(tuple, (s.tolist() for s in sequences))) == sorted(
        tuple(expected[i : i + 4]) for i in range(0, len(expected) // 4 * 4, 4)
    )


def test_jsonl_text_column(tmp_path, tokenizer):
    rows = [{"text": "peace and war"}, {"text": "army navy"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = DataConfig(files=[str(tmp_path / "d.jsonl")], split="all", n_ctx=2)
    assert local_token_stream(data, tokenizer).numel() == sum(
        len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows
    )


def test_train_and_test_splits_are_disjoint_and_cover_all(tmp_path, tokenizer):
    make_corpus(tmp_path, n_docs=100, words_per_doc=20)

    def n_tokens(split):
        return local_token_stream(
            DataConfig(files=[str(tmp_path / "*.txt")], split=split, n_ctx=8), tokenizer
        ).numel()

    assert n_tokens("train") + n_tokens("test") == n_tokens("all")
    assert 0 < n_tokens("test") < 0.2 * n_tokens("all")


def test_ranks_see_disjoint_sequences(corpus_dir, tokenizer):
    data = DataConfig(files=[str(corpus_dir / "*.txt")], split="all", n_ctx=16, seed=3)
    rank0 = {tuple(s.tolist()) for s in iter_sequences(data, tokenizer, rank=0, world_size=2)}
    rank1 = {tuple(s.tolist()) for s in iter_sequences(data, tokenizer, rank=1, world_size=2)}
    everything = [tuple(s.tolist()) for s in iter_sequences(data, tokenizer)]
    assert rank0.isdisjoint(rank1) and len(rank0) + len(rank1) == len(everything)


def test_seed_sets_the_order(corpus_dir, tokenizer):
    def first(seed):
        data = DataConfig(files=[str(corpus_dir / "*.txt")], split="all", n_ctx=16, seed=seed)
        return next(iter_sequences(data, tokenizer))

    assert torch.equal(first(0), first(0)) and not torch.equal(first(0), first(1))


def test_too_small_corpus_says_how_many_tokens(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the state of the union")
    data = DataConfig(files=[str(tmp_path / "a.txt")], split="all", n_ctx=4)
    with pytest.raises(
        DataError, match=r"n_samples: the data has 3 sequences of 4 tokens \(12 tokens\); the run needs 10"
    ):
        next(iter_batches(data, tokenizer, batch_size=2, n_samples=10, field="n_samples"))


def test_missing_files_are_one_line(tmp_path, tokenizer):
    data = DataConfig(files=[str(tmp_path / "missing*.txt")], n_ctx=4)
    with pytest.raises(DataError, match="matches no file"):
        local_token_stream(data, tokenizer)


def test_dataset_name_path_streams_pretokenized_rows(tmp_path, tokenizer):
    # the hub code path (`datasets.load_dataset(name, streaming=True)`), pointed at a local folder
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"input_ids": list(range(i * 10, i * 10 + 10))} for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = DataConfig(dataset_name=str(folder), is_tokenized=True, n_ctx=5, seed=0)
    sequences = [s.tolist() for s in iter_sequences(data, tokenizer)]
    # 6 rows of 10 ids -> 12 sequences of 5, each a contiguous slice of one row
    assert len(sequences) == 12
    assert sorted(sequences) == sorted([list(range(k * 5, k * 5 + 5)) for k in range(12)])
    batches = list(iter_batches(data, tokenizer, batch_size=4, n_samples=8, field="n_samples"))
    assert [b.shape for b in batches] == [torch.Size([4, 5]), torch.Size([4, 5])]


def test_unreachable_dataset_name_is_one_line(tmp_path, tokenizer):
    data = DataConfig(dataset_name=str(tmp_path / "no-such-dataset"), n_ctx=4)
    with pytest.raises(DataError, match=r"^dataset_name: cannot load .*no-such-dataset") as info:
        next(iter_sequences(data, tokenizer))
    assert not info.value.transient  # not there: a sweep does not retry the trial


def test_unreachable_hub_is_a_transient_data_error(tokenizer):
    # the tests run with HF_HUB_OFFLINE=1: the hub answers like a network failure
    data = DataConfig(dataset_name="apollo-research/Skylion007-openwebtext-tokenizer-gpt2", n_ctx=4)
    with pytest.raises(DataError, match=r"^dataset_name: cannot load .*Couldn't reach") as info:
        next(iter_sequences(data, tokenizer))
    assert info.value.transient  # maybe the network: a sweep retries the trial


def test_pretokenized_local_rows_are_split_and_not_separated(tmp_path, tokenizer):
    rows = [{"input_ids": list(range(i * 8, i * 8 + 8))} for i in range(60)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def stream(split):
        data = DataConfig(files=[str(tmp_path / "t.jsonl")], is_tokenized=True, split=split, n_ctx=8)
        return local_token_stream(data, tokenizer).tolist()

    train, test, everything = stream("train"), stream("test"), stream("all")
    assert everything == list(range(480))  # rows joined as they are: no EOS between chunks
    assert 0 < len(test) < len(train) and sorted(train + test) == everything


def test_dataset_name_ranks_tokenize_only_their_own_rows(tmp_path, tokenizer):
    """With 2 DDP ranks, each rank streams and tokenizes only its own rows of a hub dataset
    (not every row, keeping every second sequence): the ranks' rows are disjoint and together
    are all rows."""
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = [" ".join(f"word{i}" for _ in range(30)) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    data = DataConfig(dataset_name=str(folder), n_ctx=4, seed=0)

    class RecordingTokenizer:
        def __init__(self):
            self.texts = []
            self.eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            self.texts.append(text)
            return tokenizer(text, **kwargs)

    ranks = [RecordingTokenizer(), RecordingTokenizer()]
    for rank, recorder in enumerate(ranks):
        assert len(list(iter_sequences(data, recorder, rank, 2))) > 0
    assert [len(r.texts) for r in ranks] == [3, 3]
    assert sorted(ranks[0].texts + ranks[1].texts) == sorted(texts)
