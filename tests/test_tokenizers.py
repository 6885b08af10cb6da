import pytest

from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError

TEXT = "ROMEO:\n  But soft! what light   through yonder window breaks?\n\n\tÉtude — 3.14 naïve 日本語 🙂\n"


def test_char_round_trip_and_unknown_char(tmp_path):
    tok = tokenizers.train("char", [TEXT], 0)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path)
    again = tokenizers.load(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT)
    with pytest.raises(JaxgptError, match="not in this char tokenizer"):
        tok.encode("Z")


def test_sentencepiece_is_lossless(tmp_path, corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    tok = tokenizers.train("sentencepiece", texts, 600)
    for text in [TEXT, texts[0][:2000], "  leading and trailing  \n\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert tokenizers.load(tmp_path).encode(TEXT) == tok.encode(TEXT)
    assert tok.vocab_size == 600 and 0 <= tok.eos_id < 600


def test_sentencepiece_vocab_too_big_is_clear():
    with pytest.raises(JaxgptError, match="lower data.vocab_size"):
        tokenizers.train("sentencepiece", ["tiny corpus " * 10], 50000)


def test_gpt2_matches_reference_ids(tmp_path):
    tok = tokenizers.train("gpt2", [], 0)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path)
    assert tokenizers.load(tmp_path).encode(TEXT) == tok.encode(TEXT)


def test_unknown_kind():
    with pytest.raises(JaxgptError, match="unknown data.tokenizer"):
        tokenizers.train("wordpiece", [], 0)
