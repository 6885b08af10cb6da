"""Chat: a turn on the reused KV cache equals recomputing the whole conversation; the cache holds the ids of
tokenizing the whole conversation at once; the context policy."""

import types

import jax
import pytest

from jaxgpt.api import LanguageModel
from jaxgpt import conversation as conv
from jaxgpt.chat import ChatSession
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
    T = conv.DEFAULT
    chat = ChatSession(params, CFG, tok, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}]
    for i, msg in enumerate(["Hi there", "What is 2+2?", "ok"]):
        cached_before = list(chat.cached)
        reply = chat.send(msg, max_new_tokens=12, temperature=0.0)
        prompt = conv.prompt_ids(T, messages + [{"role": "user", "content": msg}], tok)
        expected = from_scratch(params, prompt, 12)
        assert reply == conv.reply_text(T, expected, tok)
        # Only the new turn went through the prefill (plus the end-of-text of a reply cut at max_new_tokens).
        new_turn = len(conv.message_ids(T, "user", msg, tok)[0] + conv.header_ids(T, "assistant", tok))
        closing = 1 if i and cached_before[-1] != tok.eos_id else 0
        assert chat.last_prefill == (len(prompt) if i == 0 else new_turn + closing)
        messages += [{"role": "user", "content": msg}, {"role": "assistant", "content": reply}]
        assert chat.tokens == conv.conversation_ids(T, messages, tok)
        assert chat.cached == chat.tokens[:len(chat.cached)]  # the cache holds the whole conversation's ids
    assert chat.tokens[:len(chat.system_ids)] == tok.encode("SYSTEM:\nBe brief.") + [0]


def test_a_reply_in_other_ids_than_its_text_is_prefilled_again(params):
    tok = AsciiTokenizer()
    chat = ChatSession(params, CFG, tok)
    first = chat.send("Hello", max_new_tokens=8, temperature=0.0)
    # As if the model had written its reply in ids that re-tokenizing the text does not give back.
    k = len(chat.cached) - 3
    chat.cached[k] = 99 if chat.cached[k] != 99 else 98
    second = chat.send("More", max_new_tokens=8, temperature=0.0)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "More"}]
    prompt = conv.prompt_ids(conv.DEFAULT, messages, tok)
    assert chat.last_prefill == len(prompt) - k
    assert second == conv.reply_text(conv.DEFAULT, from_scratch(params, prompt, 8), tok)


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
            kept = chat.tokens[:-len(chat.turns[-1][1])] + chat.reply_header_ids
            assert kept[:len(chat.system_ids)] == chat.system_ids
            assert len(kept) < len(before) + len(conv.message_ids(conv.DEFAULT, "user", msg, tok)[0])
            ref = generate_ids(params, CFG, [kept], 16, eos_id=0, n_vocab=128,
                               sampling=SamplingParams(0.0, repetition_penalty=1.3))[0]
            assert reply == conv.reply_text(conv.DEFAULT, ref, tok)
    assert chat.n_dropped > 0 and len(chat.history) == len(chat.turns) == 6 - chat.n_dropped
    with pytest.raises(JaxgptError, match="does not fit"):
        chat.send("x" * 300, max_new_tokens=8)
