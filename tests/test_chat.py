"""Chat: a turn on the reused KV cache equals recomputing the whole conversation; the context policy."""

import types

import jax
import pytest

from jaxgpt.api import LanguageModel
from jaxgpt.chat import ChatSession, render_system, render_user
from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import SamplingParams, generate_ids
from jaxgpt.model import init_params

CFG = ModelConfig(vocab_size=132, block_size=256, n_layer=2, n_head=2, n_embd=32)


class AsciiTokenizer:
    """id = ASCII code (1..127); 0 is end-of-text."""

    kind, vocab_size, eos_id = "ascii", 128, 0

    def encode(self, text):
        return [min(ord(c), 127) or 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 0)


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(1))
    return jax.tree.map(lambda a: a * 4 if a.ndim > 1 else a, p)


def from_scratch(params, conversation_ids, n):
    """The reply recomputed over the whole conversation with no cache reuse (left-padded prefill)."""
    return generate_ids(params, CFG, [conversation_ids], n, eos_id=0, n_vocab=128, sampling=SamplingParams(0.0))[0]


def test_reused_cache_equals_recomputing_the_conversation(params):
    tok = AsciiTokenizer()
    chat = ChatSession(params, CFG, tok, system="Be brief.")
    prefilled = []
    run = chat._prefill
    chat._prefill = lambda ids: prefilled.append(len(ids)) or run(ids)
    for i, msg in enumerate(["Hi there", "What is 2+2?", "ok"]):
        before = chat.tokens
        closing = [0] if chat.turns and chat.turns[-1][1][-1:] != [0] else []
        reply = chat.send(msg, max_new_tokens=12, temperature=0.0)
        user_ids = tok.encode(render_user(msg))
        expected = from_scratch(params, before + closing + user_ids, 12)
        assert reply == tok.decode(expected)
        # Only the new turn (plus a closing end-of-text for a cut reply) went through the prefill.
        assert prefilled[-1] == (len(before) + len(user_ids) if i == 0 else len(closing) + len(user_ids))
    assert chat.tokens[:len(tok.encode(render_system("Be brief.")))] == tok.encode("<|system|>\nBe brief.\n")
    assert chat.cached == chat.tokens[:len(chat.cached)]


def test_without_reuse_gives_the_same_replies(params):
    msgs = ["Hello", "Tell me more"]
    a = ChatSession(params, CFG, AsciiTokenizer(), system="S")
    b = ChatSession(params, CFG, AsciiTokenizer(), system="S", reuse_cache=False)
    assert [a.send(m, max_new_tokens=10, temperature=0.0) for m in msgs] == \
        [b.send(m, max_new_tokens=10, temperature=0.0) for m in msgs]


def test_long_conversation_drops_oldest_turns_and_keeps_system(params):
    tok = AsciiTokenizer()
    chat = LanguageModel(types.SimpleNamespace(model=CFG), params, tok).chat_session(system="sys")
    for i in range(6):
        msg = f"message number {i}, padded to be long"
        before = chat.tokens
        reply = chat.send(msg, max_new_tokens=16, temperature=0.0, repetition_penalty=1.3)
        assert len(chat.tokens) <= CFG.block_size
        if chat.n_dropped:  # the reply must equal a fresh computation over what was kept
            kept = chat.tokens[:-len(chat.turns[-1][1])]
            assert kept[:len(chat.system_ids)] == chat.system_ids
            assert len(kept) < len(before) + len(tok.encode(render_user(msg)))
            ref = generate_ids(params, CFG, [kept], 16, eos_id=0, n_vocab=128,
                               sampling=SamplingParams(0.0, repetition_penalty=1.3))[0]
            assert reply == tok.decode(ref)
    assert chat.n_dropped > 0 and len(chat.history) == len(chat.turns) == 6 - chat.n_dropped
    with pytest.raises(JaxgptError, match="does not fit"):
        chat.send("x" * 300, max_new_tokens=8)
