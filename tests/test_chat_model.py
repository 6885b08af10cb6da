"""Build a chat model end to end: pretrain a tiny sentencepiece model, SFT it on 8 question/answer dialogues
and one 3-turn dialogue, then get the trained answers back through every path: the fine-tune's own exact
match, ChatSession, `jaxgpt chat`, and /v1/chat/completions. Also: each command refuses a run dir of the
wrong kind in one line."""

import io
import json

import pytest

from jaxgpt import cli, conversation
from jaxgpt.api import load

QA = [("What is the capital of France?", "Paris."), ("Which colour is the sky?", "Blue, mostly."),
      ("How many legs has a spider?", "Eight legs."), ("Who wrote Hamlet?", "William Shakespeare."),
      ("What do bees make?", "Honey and wax."), ("Where does the sun rise?", "In the east."),
      ("What is two plus two?", "Four."), ("Name a large ocean.", "The Pacific Ocean.")]
COUNT = [("Let us count together.", "One."), ("And then?", "Two."), ("And then?", "Three.")]


def dialogue(turns):
    return {"messages": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                       {"role": "assistant", "content": a})]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_tiny):
    from jaxgpt.finetune import finetune, load_config

    root = tmp_path_factory.mktemp("chat_model")
    pre = train_tiny(root / "pre", {
        "data.tokenizer": "sentencepiece", "data.vocab_size": 512, "model.n_layer": 2, "model.n_head": 2,
        "model.n_embd": 64, "model.block_size": 128, "train.steps": 60, "train.batch_size": 8, "train.lr": 3e-3,
        "train.warmup_steps": 10, "train.eval_every": 60, "train.save_every": 60, "train.log_every": 20})
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(dialogue([t])) + "\n" for t in QA))
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(dialogue(d)) + "\n" for d in ([[t] for t in QA] + [COUNT]) * 8))
    cfg = load_config(None, [f"finetune.source={train}", f"finetune.val_source={qa}", f"finetune.test_source={qa}",
                             "finetune.task=sft", "finetune.gen_examples=8", "finetune.max_new_tokens=16",
                             "train.steps=400", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=20",
                             "train.eval_every=200", "train.log_every=100", "train.progress=false"], str(pre))
    finetune(cfg, root / "sft")
    classifier = root / "genre"
    cls_data = root / "cls.jsonl"
    cls_data.write_text("".join(json.dumps({"text": q, "label": "long" if len(q) > 20 else "short"}) + "\n"
                                for q, _ in QA * 4))
    finetune(load_config(None, [f"finetune.source={cls_data}", "finetune.task=classify", "train.steps=2",
                                "train.batch_size=4", "train.eval_every=2", "train.progress=false"], str(pre)),
             classifier)
    return {"pre": pre, "sft": root / "sft", "classifier": classifier}


@pytest.fixture(scope="module")
def model(runs):
    return load(runs["sft"])


def test_the_run_dir_records_its_template(runs, model):
    assert (runs["sft"] / conversation.FILE).is_file() and not (runs["pre"] / conversation.FILE).exists()
    assert model.template == conversation.for_run(runs["sft"]) == conversation.DEFAULT


def test_finetune_exact_match_on_the_trained_answers(runs):
    metrics = json.loads((runs["sft"] / "test_metrics.json").read_text())
    print("fine-tune exact_match", metrics["exact_match"], "loss", metrics["loss"])
    assert metrics["loss"] < 0.05 and metrics["exact_match"] >= 7 / 8


def test_chat_session_answers(model):
    answers = [model.chat_session().send(q, max_new_tokens=16, temperature=0.0) for q, _ in QA]
    right = sum(a == ref for a, (_, ref) in zip(answers, QA))
    print(f"chat_session {right}/8", answers)
    assert right >= 7


def test_three_turns_in_one_session_reuse_the_cache(model):
    session = model.chat_session()
    tok, T = model.tokenizer, model.template
    replies = []
    for i, (q, _) in enumerate(COUNT):
        replies.append(session.send(q, max_new_tokens=16, temperature=0.0))
        if i:  # only this turn's own tokens were prefilled: the cache held the conversation's ids
            turn = conversation.message_ids(T, "user", q, tok)[0] + conversation.header_ids(T, "assistant", tok)
            assert session.last_prefill == len(turn)
    print("3-turn replies", replies)
    assert replies[1:] == [a for _, a in COUNT[1:]]  # "And then?" answered from the context: Two, then Three
    assert session.tokens == conversation.conversation_ids(T, session_messages(session), tok)


def session_messages(session):
    return [m for q, a in session.history for m in (("user", q), ("assistant", a))]


def test_jaxgpt_chat_answers(runs, monkeypatch, capsys):
    script = "".join(f"{q}\n/reset\n" for q, _ in QA) + "/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert cli.main(["chat", "--run-dir", str(runs["sft"]), "--temperature", "0", "--max-new-tokens", "16"]) == 0
    answers = [line.removeprefix("assistant> ") for line in capsys.readouterr().out.splitlines()
               if line.startswith("assistant> ")]
    right = sum(a == ref for a, (_, ref) in zip(answers, QA))
    print(f"jaxgpt chat {right}/8", answers)
    assert len(answers) == 8 and right >= 7


def test_chat_completions_answers(model):
    from starlette.testclient import TestClient

    from jaxgpt.serve import create_app

    with TestClient(create_app(model, "sft")) as client:
        answers = []
        for q, _ in QA:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": q}],
                                                          "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["message"]["content"])
        two = client.post("/v1/chat/completions", json={"max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": COUNT[0][0]}, {"role": "assistant", "content": COUNT[0][1]},
            {"role": "user", "content": COUNT[1][0]}]}).json()["choices"][0]["message"]["content"]
    right = sum(a.strip() == ref for a, (_, ref) in zip(answers, QA))
    print(f"/v1/chat/completions {right}/8", answers, two)
    assert right >= 7 and two.strip() == COUNT[1][1]


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x"], ["chat"], ["perplexity", "--file", "FILE"], ["export", "--out", "OUT"],
    ["convert", "jaxgpt-to-hf", "--hf-dir", "OUT"], ["serve", "--port", "1"]])
def test_a_classifier_run_dir_is_refused_in_one_line(runs, tmp_path, capsys, monkeypatch, command):
    (tmp_path / "f.txt").write_text("some text")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    args = [a.replace("FILE", str(tmp_path / "f.txt")).replace("OUT", str(tmp_path / "out")) for a in command]
    at = 2 if args[0] == "convert" else 1
    assert cli.main(args[:at] + ["--run-dir", str(runs["classifier"])] + args[at:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a classifier run dir" in err and "load_classifier" in err, err


def test_typed_loading(runs):
    from jaxgpt.errors import JaxgptError
    from jaxgpt.finetune.infer import Classifier, load_classifier

    assert isinstance(load_classifier(runs["classifier"]), Classifier)
    with pytest.raises(JaxgptError, match="is a language model run dir"):
        load_classifier(runs["sft"])
    with pytest.raises(JaxgptError, match="is a classifier run dir"):
        load(runs["classifier"])
