import numpy as np
import pytest

from jaxgpt import config
from jaxgpt.data import corpus, sources, tokenizers
from jaxgpt.errors import JaxgptError


def data_cfg(tmp_path, **kw):
    return config.load(None, {"data.cache_dir": str(tmp_path / "cache"), **{f"data.{k}": v for k, v in kw.items()}}).data


def test_bundled_shakespeare_renders_plays():
    files = sources.shakespeare_files()
    assert len(files) == 38
    text = sources.render_play(files[0].read_text())
    assert "THESEUS:\nNow, fair Hippolyta, our nuptial hour\n" in text
    assert "**" not in text and "_" not in text and "  \n" not in text


def test_validation_split_is_by_document(tmp_path, corpus_dir):
    cfg = data_cfg(tmp_path, source=str(corpus_dir), val_fraction=0.25)
    train = {name for name, _ in sources.documents(cfg, "train")}
    val = {name for name, _ in sources.documents(cfg, "val")}
    assert len(train) == 9 and len(val) == 3 and not train & val


def test_corpus_cache_is_memmapped_and_reused(tmp_path, corpus_dir):
    cfg = data_cfg(tmp_path, source=f"file:{corpus_dir}/*.txt")
    tok = tokenizers.train("char", corpus.tokenizer_texts(cfg, ("train", "val")), 0)
    first = corpus.prepare(cfg, tok)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    # Tokens decode back to the training documents, separated by end-of-text.
    docs = [text for _, text in sources.documents(cfg, "train")]
    assert tok.decode(first.train[:len(docs[0])]) == docs[0] and first.train[len(docs[0])] == tok.eos_id
    stamp = (first.folder / "train.bin").stat().st_mtime_ns
    second = corpus.prepare(cfg, tok)
    assert second.folder == first.folder and (second.folder / "train.bin").stat().st_mtime_ns == stamp
    other = corpus.prepare(data_cfg(tmp_path, source=f"file:{corpus_dir}/doc0*.txt"), tok)
    assert other.folder != first.folder


def test_single_document_carves_a_tail(tmp_path):
    (tmp_path / "one.txt").write_text("abcdefghij" * 100)
    cfg = data_cfg(tmp_path, source=str(tmp_path / "one.txt"))
    tok = tokenizers.train("char", ["abcdefghij"], 0)
    with pytest.warns(UserWarning, match="single document"):
        c = corpus.prepare(cfg, tok)
    assert len(c.train) + len(c.val) == 1001 and 50 <= len(c.val) <= 150


@pytest.mark.parametrize("content, fragment", [
    (b"", "holds no text"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_corpora_are_clear_errors(tmp_path, content, fragment):
    (tmp_path / "bad.txt").write_bytes(content)
    cfg = data_cfg(tmp_path, source=str(tmp_path / "bad.txt"))
    with pytest.raises(JaxgptError, match=fragment):
        corpus.prepare(cfg, tokenizers.train("char", ["abc"], 0))
    assert not list((tmp_path / "cache" / "tokens").glob("*"))  # nothing half-written left behind


def test_missing_source(tmp_path):
    with pytest.raises(JaxgptError, match="matches no files"):
        list(sources.documents(data_cfg(tmp_path, source=str(tmp_path / "nope*.txt")), "train"))


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    s = corpus.WindowSampler(tokens, 16, 8, seed=3)
    a, b = s(5), s(5)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"][:, :-1], a["x"][:, 1:])  # targets are inputs shifted by one
    assert not np.array_equal(s(5)["x"], s(6)["x"])
    assert not np.array_equal(s(5)["x"], corpus.WindowSampler(tokens, 16, 8, seed=4)(5)["x"])
    # Each host's rows are its slice of the same global batch.
    halves = [corpus.WindowSampler(tokens, 16, 8, 3, rows=r)(5)["x"] for r in (slice(0, 4), slice(4, 8))]
    np.testing.assert_array_equal(np.concatenate(halves), a["x"])
    streamed = list(corpus.batch_stream(s, 3, 7))
    assert len(streamed) == 4
    np.testing.assert_array_equal(streamed[2]["x"], s(5)["x"])


def test_too_short_split():
    with pytest.raises(JaxgptError, match="fewer than model.block_size"):
        corpus.WindowSampler(np.arange(10, dtype=np.uint16), 16, 2, 0)


def test_tfds_source_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = data_cfg(tmp_path, source="tfds:lm1b", max_documents=20)
    with tfds.testing.mock_data(num_examples=20):
        train = list(sources.documents(cfg, "train"))
        val = list(sources.documents(cfg, "val"))
        tok = tokenizers.train("char", [t for _, t in train + val], 0)
        c = corpus.prepare(cfg, tok)
    assert len(train) == 20 and len(val) == 20  # mock data provides a 'validation' split of its own
    assert all(isinstance(t, str) and t for _, t in train)
    assert len(c.train) == sum(len(t) + 1 for _, t in train)
