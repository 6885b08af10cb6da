"""Repetition penalty, no-repeat-n-gram, min_new_tokens, stop sequences, per-row seeds, streaming, beams, sliding."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.api import LanguageModel
from jaxgpt.beam import beam_search_ids
from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import (SamplingParams, _decoder, adjust_logits, generate_ids, ngram_bans, presence,
                             stream_ids)
from jaxgpt.model import GPT, init_params

CFG = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)
N_VOCAB = 60
N = 16  # new tokens in most tests: one compile per (batch, bucket, N, n-gram size)
GREEDY = SamplingParams(0.0)


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, p)  # peaky distributions


_forward = jax.jit(lambda p, x: GPT(CFG).apply({"params": p}, x)[0])


def reference_greedy(params, prompt, n, penalty=1.0, ngram=0, eos=-1, min_new=0):
    """Full recompute every step, controls applied by hand in numpy."""
    ids, out = list(prompt), []
    for step in range(n):
        padded = np.zeros((1, CFG.block_size), np.int32)
        padded[0, :len(ids)] = ids
        logits = np.array(_forward(params, padded)[0, len(ids) - 1], np.float64)
        logits[N_VOCAB:] = -np.inf
        for t in set(ids):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        if ngram and len(ids) >= ngram:
            tail = tuple(ids[len(ids) - ngram + 1:])
            for j in range(len(ids) - ngram + 1):
                if tuple(ids[j:j + ngram - 1]) == tail:
                    logits[ids[j + ngram - 1]] = -np.inf
        if step < min_new and eos >= 0:
            logits[eos] = -np.inf
        nxt = int(np.argmax(logits))
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_adjust_logits_matches_hand_computation():
    logits = jnp.array([[2.0, -1.0, 0.5, -3.0, 1.0]])
    seq = jnp.array([[1, 0, 4, 1, 0, -1, -1]])  # slots 5, 6 empty; pos = 5
    seen = presence(seq, 5)
    assert seen.tolist() == [[True, True, False, False, True]]
    s = SamplingParams(repetition_penalty=2.0, min_new_tokens=3)
    got = adjust_logits(logits, seen, seq, jnp.int32(5), jnp.int32(0), s, jnp.int32(3), 2)
    # 0 -> 2/2, 1 -> -1*2, 4 -> 1/2; last token 0 followed 0 once before (0 -> 4): 4 banned; eos 3 banned (i < 3).
    assert got.tolist() == [[1.0, -2.0, 0.5, -np.inf, -np.inf]]
    later = adjust_logits(logits, seen, seq, jnp.int32(5), jnp.int32(3), s._replace(repetition_penalty=1.0),
                          jnp.int32(3), 0)
    assert later.tolist() == logits.tolist()  # penalty 1, no n-grams, past min_new_tokens: unchanged
    # Trigrams: last two (1, 0) occurred at slots 0-1, followed by 4.
    assert np.flatnonzero(ngram_bans(seq, jnp.int32(5), 3, 5)[0]).tolist() == [4]
    assert not ngram_bans(seq, jnp.int32(2), 3, 5).any()  # too short for a trigram to repeat


def test_penalty_one_is_plain_greedy_and_penalty_matches_reference(params):
    prompts = [[5, 17, 3, 9, 22], [1, 2]]
    plain = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY)
    one = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB,
                       sampling=GREEDY._replace(repetition_penalty=1.0))
    assert one == plain == [reference_greedy(params, p, N) for p in prompts]
    pen = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB,
                       sampling=GREEDY._replace(repetition_penalty=1.8))
    assert pen == [reference_greedy(params, p, N, penalty=1.8) for p in prompts]
    assert pen != plain  # this model loops when greedy; the penalty breaks it


def test_no_repeat_ngram(params):
    prompts = [[5, 17, 3, 9, 22], [1, 2]]
    out = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY, no_repeat_ngram_size=2)
    assert out == [reference_greedy(params, p, N, ngram=2) for p in prompts]
    for p, o in zip(prompts, out):
        seq = p + o
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_min_new_tokens(params):
    prompt = [5, 17, 3]
    first = reference_greedy(params, prompt, 1)[0]  # make the greedy first token end-of-text
    assert generate_ids(params, CFG, [prompt], N, eos_id=first, n_vocab=N_VOCAB, sampling=GREEDY) == [[]]
    got = generate_ids(params, CFG, [prompt], N, eos_id=first, n_vocab=N_VOCAB,
                       sampling=GREEDY._replace(min_new_tokens=5))[0]
    assert len(got) >= 5 and got == reference_greedy(params, prompt, N, eos=first, min_new=5)


def test_stop_sequences_end_rows(params):
    prompts = [[5, 17, 3, 9, 22], [1, 2]]
    full = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY,
                        no_repeat_ngram_size=2)
    stop = full[0][4:6]
    got = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY,
                       no_repeat_ngram_size=2, stop_ids=[stop, [63, 63, 63]])
    assert got[0] == full[0][:6]  # kept up to and including the stop sequence (bigrams never repeat here)
    assert got[1] == full[1][:len(got[1])] and (len(got[1]) == N or got[1][-2:] == stop)


def test_batched_with_controls_equals_one_by_one(params):
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 31, 32]]
    s = SamplingParams(temperature=0.9, top_k=8, repetition_penalty=1.3, min_new_tokens=4)
    kw = dict(eos_id=0, n_vocab=N_VOCAB, sampling=s, no_repeat_ngram_size=3, stop_ids=[[5, 6]])
    together = generate_ids(params, CFG, prompts, N, seed=[11, 12, 13], **kw)
    alone = [generate_ids(params, CFG, [p], N, seed=[sd], **kw)[0] for p, sd in zip(prompts, [11, 12, 13])]
    assert together == alone
    assert generate_ids(params, CFG, prompts, N, seed=[11, 99, 13], **kw)[0] == together[0]  # seeds are per row


def test_streaming_equals_one_call_and_no_recompile(params):
    prompts = [[5, 17, 3, 9, 22], [1, 2]]
    s = SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.2)
    kw = dict(eos_id=0, n_vocab=N_VOCAB, sampling=s, seed=3, no_repeat_ngram_size=2)
    whole = generate_ids(params, CFG, prompts, N, **kw)
    chunks = list(stream_ids(params, CFG, prompts, N, chunk=5, **kw))
    assert [sum((c[b] for c in chunks), []) for b in range(2)] == whole
    assert len(chunks) >= 2
    before = _decoder(CFG, N, 2)._cache_size()
    generate_ids(params, CFG, [[3] * 9, [4] * 14], N, **{**kw, "sampling": s._replace(repetition_penalty=1.7)})
    assert _decoder(CFG, N, 2)._cache_size() == before  # new lengths in the bucket, new penalty: same program


def test_beam_search(params):
    prompts = [[5, 17, 3, 9, 22], [1, 2]]
    greedy = generate_ids(params, CFG, prompts, N, eos_id=0, n_vocab=N_VOCAB, sampling=GREEDY)
    assert beam_search_ids(params, CFG, prompts, N, num_beams=1, eos_id=0, n_vocab=N_VOCAB) == greedy
    beams = beam_search_ids(params, CFG, prompts, N, num_beams=4, eos_id=-1, n_vocab=N_VOCAB)

    def logprob(prompt, out):
        ids = np.zeros((1, CFG.block_size), np.int32)
        ids[0, :len(prompt + out)] = prompt + out
        logits = np.array(_forward(params, ids)[0], np.float64)[:, :N_VOCAB]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(out))

    plain = generate_ids(params, CFG, prompts, N, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY)
    for p, b, g in zip(prompts, beams, plain):
        assert len(b) == N and logprob(p, b) >= logprob(p, g) - 1e-4  # here the beam finds at least greedy's


def test_sliding_past_block_size(params):
    prompt = list(range(1, 61))  # 60 of 64 slots
    with pytest.raises(JaxgptError, match="--max-new-tokens.*drop --no-slide"):
        generate_ids(params, CFG, [prompt], 30, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY, slide=False)
    got = generate_ids(params, CFG, [prompt], 30, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY)[0]  # slides
    assert len(got) == 30
    assert got[:4] == generate_ids(params, CFG, [prompt], 4, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY)[0]
    window = (prompt + got[:4])[-32:]  # then the last half of the window is re-prefilled
    assert got[4:30] == generate_ids(params, CFG, [window], 26, eos_id=-1, n_vocab=N_VOCAB, sampling=GREEDY)[0]


class ByteTokenizer:
    kind, vocab_size, eos_id = "bytes", 60, 0

    def encode(self, text):
        return [min(b, 59) or 1 for b in text.encode()]

    def decode(self, ids):
        return bytes(i for i in ids if i > 0).decode(errors="replace")


def test_api_stop_strings_streaming_and_errors(params):
    tok = ByteTokenizer()
    lm = LanguageModel(types.SimpleNamespace(model=CFG), params, tok)
    kw = dict(max_new_tokens=N, temperature=0.0, no_repeat_ngram_size=2, min_new_tokens=N)
    full = lm.generate("abc", **kw)
    stop = full[5:7]
    assert len(full) == N and len(stop) == 2
    cut = lm.generate("abc", stop=stop, **kw)
    assert cut == full[:full.index(stop)]
    assert "".join(lm.generate("abc", stop=stop, stream=True, **kw)) == cut
    assert lm.generate("abc", max_new_tokens=N, temperature=0.0, num_beams=1) == \
        lm.generate("abc", max_new_tokens=N, temperature=0.0)
    for bad, match in [(dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(min_new_tokens=-2), "min_new"),
                       (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(seed=[1, 2]), "seeds")]:
        with pytest.raises(JaxgptError, match=match):
            lm.generate("abc", max_new_tokens=4, **bad)


def test_sliding_streams_what_it_generates_and_changes_nothing_that_fits(params):
    prompts = [list(range(1, 41)), [7, 8, 9]]
    sampled = SamplingParams(temperature=1.0, top_k=8)
    kw = dict(eos_id=-1, n_vocab=N_VOCAB, sampling=sampled, seed=[4, 5])
    whole = generate_ids(params, CFG, prompts, 100, **kw)  # 40 + 100 > 64: three windows
    assert [len(r) for r in whole] == [100, 100]
    pieces = list(stream_ids(params, CFG, prompts, 100, chunk=8, **kw))
    assert [sum((p[b] for p in pieces), []) for b in range(2)] == whole
    fits = generate_ids(params, CFG, [[7, 8, 9]], 20, **{**kw, "seed": [5]})
    assert fits == generate_ids(params, CFG, [[7, 8, 9]], 20, slide=False, **{**kw, "seed": [5]})
