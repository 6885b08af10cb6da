import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import ModelConfig
from jaxgpt.errors import JaxgptError
from jaxgpt.generate import SamplingParams, _decoder, filter_logits, generate_ids, prompt_bucket
from jaxgpt.model import GPT, init_params

CFG = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)
N_VOCAB = 60  # rows 60..63 are vocabulary padding and must never be produced
EOS = 0


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, p)  # peaky distributions


_forward = jax.jit(lambda p, x: GPT(CFG).apply({"params": p}, x)[0])


def last_logits_without_cache(params, ids):
    """Full forward over the whole sequence (right-padded to one shape: causal, so padding is unseen)."""
    padded = np.zeros((1, CFG.block_size), np.int32)
    padded[0, :len(ids)] = ids
    logits = np.array(_forward(params, padded)[0, len(ids) - 1])
    logits[N_VOCAB:] = -np.inf
    return logits


def greedy_without_cache(params, prompt, n):
    ids = list(prompt)
    out, all_logits = [], []
    for _ in range(n):
        logits = last_logits_without_cache(params, ids)
        all_logits.append(logits)
        nxt = int(np.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
        if nxt == EOS:
            break
    return out, all_logits


def test_cached_greedy_decode_equals_full_recompute(params):
    prompt = [5, 17, 3, 9, 22]
    ref, _ = greedy_without_cache(params, prompt, 20)
    ref = ref[:ref.index(EOS)] if EOS in ref else ref
    got = generate_ids(params, CFG, [prompt], 20, eos_id=EOS, n_vocab=N_VOCAB, sampling=SamplingParams(0.0))
    assert got[0] == ref


def test_batched_left_padded_equals_one_by_one(params):
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 31, 32]]
    together = generate_ids(params, CFG, prompts, 12, eos_id=EOS, n_vocab=N_VOCAB, sampling=SamplingParams(0.0))
    alone = [generate_ids(params, CFG, [p], 12, eos_id=EOS, n_vocab=N_VOCAB, sampling=SamplingParams(0.0))[0]
             for p in prompts]
    assert together == alone


def test_sampling_is_seeded_and_respects_top_k(params):
    s = SamplingParams(temperature=1.0, top_k=3)
    a = generate_ids(params, CFG, [[4, 5]], 30, eos_id=-1, n_vocab=N_VOCAB, sampling=s, seed=1)
    b = generate_ids(params, CFG, [[4, 5]], 30, eos_id=-1, n_vocab=N_VOCAB, sampling=s, seed=1)
    c = generate_ids(params, CFG, [[4, 5]], 30, eos_id=-1, n_vocab=N_VOCAB, sampling=s, seed=2)
    assert a == b and a != c and len(a[0]) == 30
    assert all(t < N_VOCAB for t in a[0] + c[0])
    # Every sampled token is among the top 3 of the uncached model's distribution at its position.
    ids = [4, 5]
    for t in a[0]:
        assert t in np.argsort(last_logits_without_cache(params, ids))[-3:]
        ids.append(t)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0].tolist()
    assert keep(0, 1.0) == [True] * 5
    assert keep(2, 1.0) == [True, True, False, False, False]
    assert keep(0, 0.6) == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert keep(0, 0.5) == [True, False, False, False, False]
    assert keep(0, 0.0) == [True, False, False, False, False]  # the top token always survives
    assert keep(4, 0.8) == [True, True, True, False, False]


def test_no_recompile_within_a_bucket(params):
    _decoder.cache_clear()
    for prompt in ([1, 2], [1, 2, 3, 4, 5], [9] * 11):
        generate_ids(params, CFG, [prompt], 8, eos_id=-1, n_vocab=N_VOCAB, sampling=SamplingParams(0.7, 5, 0.9))
    fn = _decoder(CFG, 8)
    assert prompt_bucket(11) == 16 and fn._cache_size() == 1


def test_prompt_too_long_is_clear(params):
    with pytest.raises(JaxgptError, match="exceeds the model's context of 64.*--max-new-tokens"):
        generate_ids(params, CFG, [[1] * 60], 10, eos_id=EOS, slide=False)


def test_decode_windows_grow_by_powers_of_two_to_the_whole_cache():
    from jaxgpt.generate import decode_windows

    assert decode_windows(32, 160) == [64, 128, 160]
    assert decode_windows(64, 300) == [128, 256, 300]
    assert decode_windows(10, 50) == [50]
    assert decode_windows(200, 1024) == [256, 512, 1024]


def test_windowed_decoding_changes_no_token(monkeypatch):
    # One-shot decoding attends over a growing window of the cache (64, 128, then all 170 slots here); the
    # same request through a single whole-cache loop gives the same tokens: greedy (checked against a full
    # recompute), sampled with top-k/top-p, left-padded rows, end-of-text and a stop sequence.
    import jaxgpt.generate as generate

    cfg = ModelConfig(vocab_size=64, block_size=256, n_layer=2, n_head=2, n_embd=32)
    p = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, init_params(cfg, jax.random.key(0)))
    forward = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x)[0])
    prompt = [5, 17, 3, 9, 22, 40, 2, 8, 11, 30, 6]
    ids = list(prompt)
    for _ in range(150):  # greedy without a cache
        padded = np.zeros((1, cfg.block_size), np.int32)
        padded[0, :len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(forward(p, padded))[0, len(ids) - 1, :N_VOCAB])))
    greedy = generate_ids(p, cfg, [prompt], 150, eos_id=-1, n_vocab=N_VOCAB, sampling=SamplingParams(0.0))
    assert greedy[0] == ids[len(prompt):]

    prompts = [prompt, [7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    kwargs = dict(eos_id=EOS, n_vocab=N_VOCAB, sampling=SamplingParams(0.9, 20, 0.95), seed=3, stop_ids=[[12, 13]])
    windowed = generate_ids(p, cfg, prompts, 150, **kwargs)
    assert max(len(row) for row in windowed) > 64, "some row decodes past the first window"
    generate._decoder.cache_clear()
    monkeypatch.setattr(generate, "decode_windows", lambda P, length: [length])
    try:
        assert generate_ids(p, cfg, prompts, 150, **kwargs) == windowed
        assert generate_ids(p, cfg, [prompt], 150, eos_id=-1, n_vocab=N_VOCAB, sampling=SamplingParams(0.0)) == greedy
    finally:
        generate._decoder.cache_clear()
