"""One-shot decoding skips the forward pass after its last token, and nothing else changes."""

import jax
import numpy as np
import pytest

from jaxgpt import generate
from jaxgpt.config import ModelConfig
from jaxgpt.generate import SamplingParams, decode, decode_loop, prefill, row_keys, stop_array, traced_sampling
from jaxgpt.model import init_params

CFG = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)
N_VOCAB, EOS, N = 60, 0, 12
PROMPTS = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 31, 32]]


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, p)  # peaky distributions


def inputs(sampling, stops, eos):
    tokens_BxP, start_B = generate.left_pad(PROMPTS, 0, 16)
    return (tokens_BxP, start_B, row_keys(3, len(PROMPTS)), traced_sampling(sampling), np.int32(eos),
            np.int32(N_VOCAB), stop_array(stops))


@jax.jit
def with_trailing_forward(params, tokens_BxP, start_B, keys_B, sampling, eos_id, n_vocab, stop_SxM):
    """The reference: prefill, then the streaming loop, which runs every sampled token through the model."""
    P = tokens_BxP.shape[1]
    state = prefill(CFG, params, tokens_BxP, start_B, keys_B, n_vocab, stop_SxM, P + N)
    state = decode_loop(CFG, params, state, start_B, N, sampling, eos_id, n_vocab, stop_SxM, 0)
    return state.seq_BxL[:, P:], state.done_B


@jax.jit
def one_shot(params, tokens_BxP, start_B, keys_B, sampling, eos_id, n_vocab, stop_SxM):
    return decode(CFG, params, tokens_BxP, start_B, keys_B, N, sampling, eos_id, n_vocab, stop_SxM, N, 0)


@pytest.mark.parametrize("sampling", [SamplingParams(0.0), SamplingParams(1.0, top_k=8, min_new_tokens=2)],
                         ids=["greedy", "seeded"])
# The stop sequences end every row within three tokens, so the loop also exits early.
@pytest.mark.parametrize("stops,eos", [(None, -1), (None, EOS), ([[8, 8], [16], [27], [54]], EOS)],
                         ids=["none", "eos", "stops"])
def test_one_shot_equals_decoding_with_the_trailing_forward(params, sampling, stops, eos):
    args = inputs(sampling, stops, eos)
    want_BxN, want_done_B = with_trailing_forward(params, *args)
    got_BxN, got_done_B = one_shot(params, *args)
    np.testing.assert_array_equal(got_BxN, want_BxN)
    np.testing.assert_array_equal(got_done_B, want_done_B)


def test_generate_ids_runs_one_forward_pass_per_new_token(params, monkeypatch):
    passes = []
    real_forward = generate.forward_cached

    def counted(*args):
        jax.debug.callback(lambda: passes.append(1))  # at run time, once per forward pass
        return real_forward(*args)

    monkeypatch.setattr(generate, "forward_cached", counted)
    generate._decoder.cache_clear()
    try:
        out = generate.generate_ids(params, CFG, PROMPTS, N, eos_id=-1, n_vocab=N_VOCAB)
        jax.effects_barrier()
        assert [len(r) for r in out] == [N] * len(PROMPTS)
        assert len(passes) == N  # the prompt's prefill, then one per token except the last
        passes.clear()
        jax.block_until_ready(with_trailing_forward.__wrapped__(params, *inputs(SamplingParams(0.0), None, -1)))
        jax.effects_barrier()
        assert len(passes) == N + 1  # the streaming loop also feeds the last token (its cache continues the text)
    finally:
        generate._decoder.cache_clear()
