"""Pool-based active learning: label a seed set, fine-tune, score the unlabelled pool, query, repeat.

Every round fine-tunes afresh from the pretrained run (same seed, same head init) on the labelled set
so far, rather than continuing from the previous round: a round's model then depends only on which
examples are labelled, not on the order they arrived in, and curves of different strategies compare
like with like. Labels are revealed from the dataset (standing in for an annotator) or, with an
annotate file, written out for a person; running the same command again with the file filled in
continues. The run dir holds state.json (labelled indices, pending queries, the curve),
active_curve.jsonl (one line per round) and round_NN/ (each round's fine-tune run dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt.active import acquisition as acq
from jaxgpt.config import FinetuneRunConfig
from jaxgpt.data import tokenizers
from jaxgpt.data.records import read_jsonl
from jaxgpt.errors import JaxgptError
from jaxgpt.finetune.batches import encode
from jaxgpt.finetune.data import Example, TaskData, load_task
from jaxgpt.finetune.infer import load_params
from jaxgpt.finetune.loop import FineTuner, config_from_flat
from jaxgpt.train.signals import StopRequest

# Settings that must not change when a run dir is resumed (`rounds` may grow).
FIXED = ("strategy", "seed_size", "query_size", "diversity", "mc_samples", "pool_size")


@dataclass(frozen=True)
class ActiveConfig:
    """The `active:` section of the YAML (and `active.KEY=value` overrides)."""

    strategy: str = "entropy"  # random | least_confidence | margin | entropy | bald
    rounds: int = 8  # fine-tunes; a query follows every round but the last
    query_size: int = 64  # labels asked for per round
    seed_size: int = 64  # labelled at the start: a uniform sample of the train split
    diversity: int = 1  # m > 1: greedy k-center on pooled hidden states among the top query_size*m
    mc_samples: int = 8  # BALD: dropout passes per example
    pool_size: int = 0  # > 0: score a random subset of this many unlabelled examples each round
    annotate_file: str = ""  # JSONL for a person to label; empty: labels come from the dataset
    keep_checkpoints: bool = False  # keep every round's checkpoints (by default only the last round's)


def load_config(path: str | None, overrides: list[str],
                init_from: str | None) -> tuple[FinetuneRunConfig, ActiveConfig]:
    """The fine-tune config (as `jaxgpt finetune` builds it) and the `active.*` settings, typed the same way."""
    flat = config_lib.read_yaml(path) if path else {}
    flat.update(config_lib.parse_overrides(overrides))
    active = {k: v for k, v in flat.items() if k.startswith("active.")}
    settings = config_lib.build(active, ActiveConfig, "active.")
    return config_from_flat({k: v for k, v in flat.items() if k not in active}, init_from), settings


def check(settings: ActiveConfig, cfg: FinetuneRunConfig, n_train: int) -> None:
    acq.check_strategy(settings.strategy)
    for name in ("rounds", "query_size", "seed_size", "diversity"):
        if getattr(settings, name) <= 0:
            raise JaxgptError(f"active.{name} must be positive, got {getattr(settings, name)}")
    if settings.seed_size < cfg.train.batch_size:
        raise JaxgptError(f"active.seed_size ({settings.seed_size}) is smaller than train.batch_size "
                          f"({cfg.train.batch_size}); a fine-tune batch must fit in the labelled set")
    need = settings.seed_size + (settings.rounds - 1) * settings.query_size
    if need > n_train:
        raise JaxgptError(f"{settings.rounds} rounds of {settings.query_size} queries after {settings.seed_size} "
                          f"seed labels need {need} examples; the train split has {n_train}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one


class ActiveLearner:
    """The loop; `fit` (fine-tune a round) and `score` (score the pool) are the two expensive steps."""

    def __init__(self, cfg: FinetuneRunConfig, settings: ActiveConfig, run_dir: str | Path,
                 task: TaskData | None = None):
        self.cfg, self.settings, self.dir = cfg, settings, Path(run_dir)
        self.task = task or load_task(cfg.finetune)
        if self.task.task != "classify":
            raise JaxgptError("active learning needs a classification task (finetune.task=classify)")
        check(settings, cfg, len(self.task.train))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self._scorer = None

    # ---- state ---------------------------------------------------------------------------------

    def _fixed(self) -> dict[str, Any]:
        return {**{k: getattr(self.settings, k) for k in FIXED}, "seed": self.cfg.seed}

    def _load_state(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        if not path.is_file():
            rng = np.random.default_rng([self.cfg.seed, 0])
            seed_idx = rng.choice(len(self.task.train), self.settings.seed_size, replace=False)
            return {"settings": self._fixed(), "labelled": sorted(int(i) for i in seed_idx), "pending": [],
                    "human": {}, "queries": [], "curve": []}
        state = json.loads(path.read_text())
        for key, value in self._fixed().items():
            if state["settings"][key] != value:
                name = key if key == "seed" else f"active.{key}"
                raise JaxgptError(f"'{self.dir}' was started with {name}={state['settings'][key]!r}, not {value!r}; "
                                  "use the same value to resume or a new --run-dir")
        return state

    def _save(self) -> None:
        _write_atomic(self.dir / "state.json", json.dumps(self.state) + "\n")
        _write_atomic(self.dir / "active_curve.jsonl", "".join(json.dumps(r) + "\n" for r in self.state["curve"]))

    def labelled_examples(self) -> list[Example]:
        """The labelled train examples, with a person's labels where one was given."""
        human = self.state["human"]
        return [dataclasses.replace(self.task.train[i], label=human.get(str(i), self.task.train[i].label))
                for i in self.state["labelled"]]

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Rounds until `rounds` are done or a query waits for a person; returns the curve so far.

        SIGINT/SIGTERM stop the whole run: a round cut short is not recorded, and the same command again
        starts that round over.
        """
        with StopRequest() as stop:
            return self._rounds(stop)

    def _rounds(self, stop: StopRequest) -> list[dict[str, Any]]:
        s, curve = self.settings, self.state["curve"]
        if self.state["pending"]:
            self._receive_labels()
        while True:
            done = len(curve)
            # The query after round done-1 (also when `rounds` grew after a finished run).
            if 0 < done < s.rounds and not any(q["round"] == done - 1 for q in self.state["queries"]):
                t0 = time.perf_counter()
                chosen = self.query(done - 1)
                curve[-1]["query_seconds"] = round(time.perf_counter() - t0, 1)
                if not s.keep_checkpoints:  # the pool is scored: that round's model is not needed again
                    shutil.rmtree(self.dir / f"round_{done - 1:02d}" / "checkpoints", ignore_errors=True)
                if s.annotate_file:
                    self.state["pending"] = chosen
                    self._save()
                    self._write_annotate_file(done - 1, chosen)
                    return curve
                self.state["labelled"] += chosen
                self._save()
            if done >= s.rounds:
                return curve
            if stop.requested:
                print(f"{stop.signal_name}: stopped before round {done}; run the same command to continue", flush=True)
                return curve
            t0 = time.perf_counter()
            fitted = self.fit(done)
            if stop.requested:  # the round's fine-tune was cut short: not a point of the curve
                print(f"{stop.signal_name}: round {done} was interrupted and is not recorded; run the same command "
                      f"to run it again", flush=True)
                return curve
            record = {"round": done, "labelled": len(self.state["labelled"]), "strategy": s.strategy,
                      "seed": self.cfg.seed, "diversity": s.diversity, **fitted}
            record["seconds"] = round(time.perf_counter() - t0, 1)
            curve.append(record)
            self._save()
            print(f"active round {done}: {record['labelled']} labels, val acc {record['val_accuracy']:.4f}, "
                  f"test acc {record.get('test_accuracy', float('nan')):.4f} ({record['seconds']}s)", flush=True)

    def fit(self, r: int) -> dict[str, Any]:
        """Fine-tune afresh on the labelled set into round_NN/; val/test metrics of its best checkpoint."""
        run_dir = self.dir / f"round_{r:02d}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a round cut short before it was recorded starts over
        t, labelled = self.task, self.labelled_examples()
        summary = FineTuner(self.cfg, run_dir, TaskData(t.task, labelled, t.val, t.test, t.labels)).run()
        if summary.get("stopped_by"):
            return {}  # cut short: the caller sees the stop request and does not record this round
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best = next(rec for rec in logged if rec.get("step") == summary["best_step"] and "val_loss" in rec)
        out = {k: best[k] for k in ("val_loss", "val_accuracy", "val_macro_f1")}
        if "test" in summary:
            out.update({f"test_{k}": summary["test"][k] for k in ("loss", "accuracy", "macro_f1")})
        counts = np.bincount([t.labels.index(ex.label) for ex in labelled], minlength=len(t.labels))
        out["label_counts"] = dict(zip(t.labels, counts.tolist()))
        return out

    def pool(self, r: int) -> np.ndarray:
        """Train indices neither labelled nor waiting for a label (a random `pool_size` of them if set)."""
        taken = set(self.state["labelled"]) | set(self.state["pending"])
        pool_P = np.asarray([i for i in range(len(self.task.train)) if i not in taken], np.int64)
        if 0 < self.settings.pool_size < len(pool_P):
            keep = np.random.default_rng([self.cfg.seed, r, 1]).choice(len(pool_P), self.settings.pool_size,
                                                                       replace=False)
            pool_P = np.sort(pool_P[keep])
        return pool_P

    def query(self, r: int) -> list[int]:
        """The next query_size train indices to label, chosen by the strategy from round r's model."""
        s = self.settings
        pool_P = self.pool(r)
        scores_P, emb_PxD = self.score(r, pool_P)
        pick = acq.select(scores_P, s.query_size, emb_PxD, s.diversity)
        chosen = [int(i) for i in pool_P[pick]]
        self.state["queries"].append({"round": r, "ids": chosen, "scores": [float(scores_P[k]) for k in pick]})
        return chosen

    def score(self, r: int, pool_P: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(score_P, emb_PxD or None) of the pool under round r's best checkpoint."""
        s = self.settings
        if s.strategy == "random" and s.diversity <= 1:
            return acq.random_scores(len(pool_P), self.cfg.seed, r), None  # no model pass needed
        run_dir = self.dir / f"round_{r:02d}"
        cfg, params, _ = load_params(run_dir, "best")
        if self._scorer is None:  # one jitted scorer for all rounds: params are arguments, so it compiles once
            self._scorer = acq.make_pool_scorer(cfg.model, cfg.finetune.pooling, s.strategy, s.mc_samples)
        tok = tokenizers.load(run_dir / "tokenizer")
        max_len = cfg.finetune.max_len or cfg.model.block_size
        enc = encode([self.task.train[i] for i in pool_P], "classify", tok, max_len, self.task.labels)
        rng = jax.random.fold_in(jax.random.key(self.cfg.seed), r)
        scores_P, emb_PxD = acq.score_pool(self._scorer, params, enc, self.cfg.train.batch_size, max_len,
                                           tok.eos_id, rng)
        if s.strategy == "random":
            scores_P = acq.random_scores(len(pool_P), self.cfg.seed, r)
        return scores_P, emb_PxD

    # ---- a person as the annotator -------------------------------------------------------------

    def _write_annotate_file(self, r: int, chosen: list[int]) -> None:
        path = Path(self.settings.annotate_file)
        lines = [json.dumps({"id": i, "round": r, "text": self.task.train[i].text, "label": ""}) for i in chosen]
        _write_atomic(path, "\n".join(lines) + "\n")
        print(f"wrote {len(chosen)} examples to label to {path}: fill in each \"label\" (one of "
              f"{', '.join(self.task.labels)}) and run the same command again", flush=True)

    def _receive_labels(self) -> None:
        path = Path(self.settings.annotate_file) if self.settings.annotate_file else None
        if path is None or not path.is_file():
            raise JaxgptError(f"{len(self.state['pending'])} queried examples wait for labels; pass "
                              "--annotate-file with the filled-in file")
        pending, got = set(self.state["pending"]), {}
        for n, record in read_jsonl(path):
            if record.get("id") not in pending:
                raise JaxgptError(f"{path} line {n}: 'id' is not one of the examples this run asked about")
            label = str(record.get("label", "")).strip()
            if label not in self.task.labels:
                raise JaxgptError(f"{path} line {n}: label '{label}' is not one of {', '.join(self.task.labels)}")
            got[record["id"]] = label
        if missing := pending - set(got):
            raise JaxgptError(f"{path}: no label for {len(missing)} of the {len(pending)} queried examples "
                              f"(ids {sorted(missing)[:5]}...)")
        self.state["human"].update({str(i): label for i, label in got.items()})
        self.state["labelled"] += self.state["pending"]
        self.state["pending"] = []
        self._save()


def run(cfg: FinetuneRunConfig, settings: ActiveConfig, run_dir: str | Path) -> list[dict[str, Any]]:
    """Run (or resume) active learning in `run_dir`; returns the learning curve so far."""
    return ActiveLearner(cfg, settings, run_dir).run()
