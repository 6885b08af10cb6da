"""Task data (JSONL, CSV, TFDS mock, the Shakespeare genre task), bucketing, metrics, early stopping and
best-checkpoint selection."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.config import FinetuneConfig
from jaxgpt.data.tokenizers import CharTokenizer
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune import batches as batch_lib
from jaxgpt.train.checkpoint import Checkpointer, restore_params
from jaxgpt.finetune.data import load_task
from jaxgpt.finetune.metrics import EarlyStopping, macro_f1, rouge_l


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_jsonl_classification_with_carved_validation(tmp_path):
    records = [{"text": f"text {i}", "label": ["pos", "neg"][i % 2]} for i in range(40)]
    task = load_task(FinetuneConfig(task="classify", source=write_jsonl(tmp_path / "t.jsonl", records)))
    assert task.labels == ["neg", "pos"] and len(task.train) == 36 and len(task.val) == 4 and not task.test


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "a", "label": "pos"', "line 3: not valid JSON"),
    ('["a", "pos"]', "line 3: expected a JSON object"),
    ('{"txt": "a", "label": "pos"}', "line 3: a classification record needs 'text' and 'label'"),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, line])
    with pytest.raises(JaxgptError, match=fragment):
        load_task(FinetuneConfig(task="classify", source=path))


def test_unknown_labels_name_the_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": str(i), "label": "ab"[i % 2]} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}])
    with pytest.raises(JaxgptError, match=r"val.jsonl line 2: unknown label 'c' \(labels: a, b\)"):
        load_task(FinetuneConfig(task="classify", source=train, val_source=val))
    with pytest.raises(JaxgptError, match=r"train.jsonl line 2: unknown label 'b'"):
        load_task(FinetuneConfig(task="classify", source=train, labels="a,z"))


def test_csv_records_and_bad_rows(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('prompt,response\n"What, then?",Nothing.\nHi,Hello\n' * 10)
    task = load_task(FinetuneConfig(task="sft", source=str(good)))
    assert task.train[0].messages == [{"role": "user", "content": "What, then?"},
                                      {"role": "assistant", "content": "Nothing."}]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,a\nfine,b\ntoo,many,cells\n")
    with pytest.raises(JaxgptError, match="bad.csv line 4: expected 2 columns"):
        load_task(FinetuneConfig(task="classify", source=str(bad)))


def test_bad_messages_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}])
    with pytest.raises(JaxgptError, match="chat.jsonl line 2: turn 2 has role 'robot'"):
        load_task(FinetuneConfig(task="sft", source=path))


def test_tfds_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20):
        task = load_task(FinetuneConfig(source="tfds:imdb_reviews"))
    assert task.task == "classify" and len(task.labels) == 2  # ClassLabel names (the mock's are "0", "1")
    assert len(task.train) == 18 and len(task.val) == 2 and len(task.test) == 20  # val carved out of train
    assert isinstance(task.train[0].text, str)


def test_shakespeare_genre_splits_by_play():
    task = load_task(FinetuneConfig(source="shakespeare_genre", passages_per_play=5))
    assert task.labels == ["comedy", "history", "tragedy"]
    plays = {name: {ex.where.split(" passage")[0] for ex in getattr(task, name)} for name in ("train", "val", "test")}
    assert not (plays["train"] & plays["test"]) and not (plays["train"] & plays["val"])
    assert not (plays["val"] & plays["test"])
    assert {ex.label for ex in task.test} == set(task.labels)
    assert not any("Tragedy of" in ex.text for ex in task.train)  # titles (which name the genre) are cut


def test_buckets_keep_compiled_shapes_few():
    tok = CharTokenizer(list("ab"))
    from jaxgpt.finetune.data import Example

    examples = [Example(str(n), text="a" * n, label="x") for n in range(1, 120)]
    enc = batch_lib.encode(examples, "classify", tok, 96, ["x"])
    stream = batch_lib.train_batches(enc, 8, 96, tok.eos_id, seed=0)
    shapes = {next(stream)["tokens"].shape for _ in range(60)}
    assert shapes <= {(8, 16), (8, 32), (8, 64), (8, 96)}
    batch = next(stream)
    row = batch["tokens"][0]
    assert batch["start"][0] == (row == tok.eos_id).sum()  # left padding counted by start


def test_metrics():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert macro_f1(true, true, 3) == 1.0
    assert macro_f1(np.zeros(6, int), true, 3) == pytest.approx((2 * 2 / (4 + 4)) / 3)
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("the cat", "the big cat") == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3))


def test_early_stopping_stops_at_the_right_evaluation():
    stopper = EarlyStopping(patience=2, min_delta=0.01, mode="max")
    sequence = [0.50, 0.60, 0.605, 0.65, 0.655, 0.652, 0.9]  # 0.605 and 0.655 are within min_delta
    stopped_at = next(step for step, v in enumerate(sequence, 1) if stopper.update(v, step))
    assert stopped_at == 6 and stopper.best == 0.65 and stopper.best_step == 4
    loss = EarlyStopping(patience=1, min_delta=0.0, mode="min")
    assert [loss.update(v, i) for i, v in enumerate([3.0, 2.0, 2.5])] == [False, False, True]
    assert not any(EarlyStopping(0, 0.0, "min").update(v, i) for i, v in enumerate([1.0, 2.0, 3.0]))


def test_best_checkpoint_is_selected_and_latest_kept(tmp_path):
    def state(value):
        return {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.full((3,), value)}, "opt_state": {"count": jnp.zeros((), jnp.int32)}}

    ckpt = Checkpointer(tmp_path, "val_macro_f1", "max")
    for step, f1 in [(10, 0.5), (20, 0.8), (30, float("nan")), (40, 0.7)]:
        ckpt.save(step, state(float(step)), {"val_loss": 1.0, "val_macro_f1": f1})
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30, 40]
    params, step = restore_params(tmp_path, {"w": jnp.zeros((3,))})  # ranked as the writer ranked: by macro-F1
    assert step == 20 and float(params["w"][0]) == 20.0
    by_loss = Checkpointer(tmp_path / "loss", "val_loss", "min")
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.7)]:
        by_loss.save(step, state(float(step)), {"val_loss": loss})
    assert by_loss.best_step() == 2
    by_loss.close()
