"""Active learning: acquisition scores against hand computations, diverse batch selection, the loop's
bookkeeping (with a stand-in fine-tune), the annotate-file round trip, and the CLI end to end."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jaxgpt import config as config_lib
from jaxgpt.active import ActiveConfig, ActiveLearner, acquisition as acq, load_config
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune.data import Example, TaskData

PROBS_NxC = np.asarray([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], np.float32)


def test_uncertainty_scores_match_hand_computation():
    np.testing.assert_allclose(acq.least_confidence(PROBS_NxC), [0.3, 0.6, 2 / 3, 0.0], atol=1e-6)
    np.testing.assert_allclose(acq.margin(PROBS_NxC), [1 - 0.5, 1 - 0.05, 1.0, 0.0], atol=1e-6)
    h = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
         -(0.4 * math.log(0.4) + 0.35 * math.log(0.35) + 0.25 * math.log(0.25)), math.log(3), 0.0]
    np.testing.assert_allclose(acq.entropy(PROBS_NxC), h, atol=1e-6)


def test_bald_is_mutual_information_of_mc_samples():
    # Row 0: the passes disagree confidently (all epistemic); row 1: they agree on 50/50 (all aleatoric);
    # row 2: mean (0.6, 0.4), each pass's entropy differs.
    probs_TxNxC = np.asarray([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]],
                              [[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]]], np.float32)

    def h(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    want = [math.log(2), 0.0, h([0.6, 0.4]) - (h([0.9, 0.1]) + h([0.3, 0.7])) / 2]
    np.testing.assert_allclose(acq.bald(probs_TxNxC), want, atol=1e-6)


def test_random_is_seeded_and_reproducible():
    a, b = acq.random_scores(100, seed=3, round_=1), acq.random_scores(100, seed=3, round_=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, acq.random_scores(100, seed=4, round_=1))
    assert not np.array_equal(a, acq.random_scores(100, seed=3, round_=2))
    pick = acq.select(a, 10)
    assert len(set(pick.tolist())) == 10 and np.all(a[pick] >= np.sort(a)[-10])


def test_diversity_spreads_the_query_and_never_repeats():
    rng = np.random.default_rng(0)
    centres = np.asarray([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # Cluster 0 holds the 8 most uncertain points (near-duplicates); clusters 1 and 2 come next.
    emb_NxD = np.concatenate([centres[c] + 0.01 * rng.normal(size=(8, 2)) for c in range(3)])
    scores_N = np.concatenate([np.linspace(1.0, 0.9, 8), np.linspace(0.8, 0.7, 8), np.linspace(0.6, 0.5, 8)])
    plain = acq.select(scores_N, 3)
    assert set(plain.tolist()) <= set(range(8))  # top-k alone: three near-duplicates
    diverse = acq.select(scores_N, 3, emb_NxD, diversity=8)
    assert sorted(i // 8 for i in diverse) == [0, 1, 2] and diverse[0] == 0  # one per cluster, the top first
    same = acq.select(np.ones(6), 4, np.zeros((6, 2)), diversity=2)  # identical points: still distinct picks
    assert len(set(same.tolist())) == 4


class FakeLearner(ActiveLearner):
    """The loop with a stand-in fine-tune (records what it was given) and a score that favours low indices,
    so a loop that forgot what is labelled would ask for the same examples again."""

    def fit(self, r):
        self.fitted = getattr(self, "fitted", []) + [[(ex.text, ex.label) for ex in self.labelled_examples()]]
        return {"val_loss": 1.0, "val_accuracy": 0.5 + r / 100, "val_macro_f1": 0.5, "test_accuracy": 0.4 + r / 100,
                "test_macro_f1": 0.4}

    def score(self, r, pool_P):
        return -pool_P.astype(np.float32), None


def toy_task(n=60):
    train = [Example(f"line {i}", text=f"text {i}", label="ab"[i % 2]) for i in range(n)]
    return TaskData("classify", train, train[:4], train[:4], ["a", "b"])


def toy_cfg():
    return config_lib.build({"train.batch_size": 8, "seed": 1}, config_lib.FinetuneRunConfig)


def test_loop_grows_by_query_size_and_never_requeries(tmp_path):
    settings = ActiveConfig(strategy="entropy", rounds=4, query_size=5, seed_size=8)
    learner = FakeLearner(toy_cfg(), settings, tmp_path, toy_task())
    curve = learner.run()
    assert [r["labelled"] for r in curve] == [8, 13, 18, 23]
    labelled = learner.state["labelled"]
    assert len(set(labelled)) == len(labelled) == 23
    seen = set(labelled[:8])
    for q in learner.state["queries"]:
        assert len(q["ids"]) == 5 and not seen & set(q["ids"])
        seen |= set(q["ids"])
    lines = (tmp_path / "active_curve.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
    more = FakeLearner(toy_cfg(), ActiveConfig(strategy="entropy", rounds=5, query_size=5, seed_size=8), tmp_path,
                       toy_task())
    assert [r["labelled"] for r in more.run()] == [8, 13, 18, 23, 28]  # resumed: only the new round ran
    assert len(more.fitted) == 1
    with pytest.raises(JaxgptError, match="active.strategy='entropy', not 'margin'"):
        FakeLearner(toy_cfg(), ActiveConfig(strategy="margin", rounds=5, query_size=5, seed_size=8), tmp_path,
                    toy_task())


def test_annotate_file_round_trip(tmp_path):
    ask = tmp_path / "to_label.jsonl"
    settings = ActiveConfig(strategy="margin", rounds=3, query_size=4, seed_size=8, annotate_file=str(ask))
    first = FakeLearner(toy_cfg(), settings, tmp_path / "run", toy_task())
    assert len(first.run()) == 1  # round 0, then it stops for a person
    asked = [json.loads(line) for line in ask.read_text().splitlines()]
    assert len(asked) == 4 and all(r["label"] == "" and r["text"].startswith("text ") for r in asked)
    with pytest.raises(JaxgptError, match="label '' is not one of a, b"):
        FakeLearner(toy_cfg(), settings, tmp_path / "run", toy_task()).run()
    ask.write_text("".join(json.dumps({**r, "label": "b"}) + "\n" for r in asked))  # the person says "b" to all
    second = FakeLearner(toy_cfg(), settings, tmp_path / "run", toy_task())
    assert [r["labelled"] for r in second.run()] == [8, 12]
    given = dict(second.fitted[0])
    assert all(given[r["text"]] == "b" for r in asked)  # the person's labels, not the dataset's
    assert {json.loads(line)["id"] for line in ask.read_text().splitlines()}.isdisjoint(r["id"] for r in asked)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(JaxgptError, match="unknown acquisition strategy 'entropyy'"):
        FakeLearner(toy_cfg(), ActiveConfig(strategy="entropyy", seed_size=8), tmp_path, toy_task())
    with pytest.raises(JaxgptError, match="need 344 examples; the train split has 60"):
        FakeLearner(toy_cfg(), ActiveConfig(rounds=5, query_size=70, seed_size=64), tmp_path, toy_task())
    with pytest.raises(JaxgptError, match="did you mean 'active.query_size'"):
        load_config(None, ["active.querysize=3"], str(tmp_path))


# ---- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, train_tiny):
    return train_tiny(tmp_path_factory.mktemp("pre") / "run", {
        "train.steps": 2, "train.batch_size": 4, "train.eval_every": 2, "train.save_every": 2})


def task_file(path, n, seed):
    words = {"pos": ["good", "fine", "great", "nice"], "neg": ["bad", "poor", "awful", "sad"]}
    lines = []
    for i in range(n):
        label = "pos" if (i * 7 + seed) % 3 else "neg"
        lines.append(json.dumps({"text": f"it was {words[label][i % 4]} and {words[label][(i + seed) % 4]}",
                                 "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cli_two_rounds_of_bald_with_diversity_then_plot(tmp_path, pretrained):
    from jaxgpt.cli import main

    cfg = tmp_path / "al.yaml"
    cfg.write_text("train:\n  steps: 4\n  batch_size: 8\n  lr: 3.0e-3\n  warmup_steps: 1\n  eval_every: 2\n"
                   "  progress: false\nfinetune:\n  task: classify\n  max_len: 32\n"
                   "active:\n  seed_size: 8\n  mc_samples: 3\n  diversity: 2\n")
    run = tmp_path / "active"
    out = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "active", "--config", str(cfg), "--init-from",
                          str(pretrained), "--run-dir", str(run), "--rounds", "2", "--query-size", "8",
                          "--strategy", "bald", "model.dropout=0.1",
                          f"finetune.source={task_file(tmp_path / 'train.jsonl', 48, 1)}",
                          f"finetune.test_source={task_file(tmp_path / 'test.jsonl', 16, 2)}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    curve = [json.loads(line) for line in (run / "active_curve.jsonl").read_text().splitlines()]
    assert [r["labelled"] for r in curve] == [8, 16] and all(r["strategy"] == "bald" for r in curve)
    assert {"val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "seed"} <= set(curve[0])
    state = json.loads((run / "state.json").read_text())
    assert len(set(state["labelled"])) == 16 and not set(state["queries"][0]["ids"]) & set(state["labelled"][:8])
    assert not (run / "round_00" / "checkpoints").exists() and (run / "round_01" / "checkpoints").is_dir()
    png = tmp_path / "curves.png"
    assert main(["plot", "--curves", str(run), "--out", str(png), "--target", "0.0"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", "--curves", str(tmp_path), "--out", str(png)]) == 2  # no curve there: a one-line error
