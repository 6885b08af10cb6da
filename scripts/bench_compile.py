"""Compile time and memory of the training step: scan over layers and rematerialisation.

For a GPT-2-sized model this lowers and compiles `pretrain_step` (no step is run) and reports
  - compile seconds with and without `model.scan_layers` at L and 2L layers (scan should stay flat),
  - XLA's memory analysis (temp + argument bytes) for each `model.remat` policy.

    python scripts/bench_compile.py                       # gpt2-124m shapes, batch 1, block 1024
    python scripts/bench_compile.py --preset small --batch 8

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from jaxgpt import sharding
from jaxgpt.config import PRESETS, MeshConfig, ModelConfig, TrainConfig
from jaxgpt.train import sharded


def compile_step(model_cfg: ModelConfig, batch: int, train_cfg: TrainConfig = TrainConfig(steps=10)):
    """(compile seconds, XLA temp bytes, argument bytes) of the training step."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    fns = sharded.build(model_cfg, train_cfg, mesh, jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, model_cfg.block_size), jnp.int32)
    t0 = time.perf_counter()
    compiled = fns.step.lower(fns.abstract_state, {"x": tokens, "y": tokens}, jax.random.key(0)).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    args = getattr(mem, "argument_size_in_bytes", None) if mem is not None else None
    return seconds, temp, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50304)
    args = parser.parse_args()
    base = ModelConfig(**{**PRESETS[args.preset], "vocab_size": args.vocab})
    rows = []
    for layers in (base.n_layer, 2 * base.n_layer):
        for scan in (False, True):
            cfg = dataclasses.replace(base, n_layer=layers, scan_layers=scan)
            seconds, temp, _ = compile_step(cfg, args.batch)
            rows.append({"what": "compile", "layers": layers, "scan": scan, "compile_s": round(seconds, 2),
                         "temp_bytes": temp})
    # XLA's CPU scheduler hoists recomputation next to the forward pass, so without scan remat saves
    # nothing there; inside a scan the backward loop must recompute per layer.
    for scan in (False, True):
        for remat in ("none", "dots_saveable", "full"):
            cfg = dataclasses.replace(base, remat=remat, scan_layers=scan)
            seconds, temp, arg_bytes = compile_step(cfg, args.batch)
            rows.append({"what": "remat", "layers": base.n_layer, "scan": scan, "remat": remat,
                         "compile_s": round(seconds, 2), "temp_bytes": temp, "argument_bytes": arg_bytes})
    print(f"{'what':8} {'layers':>6} {'variant':>28} {'compile s':>10} {'temp MiB':>10}")
    for r in rows:
        variant = f"scan={r['scan']}" + ("" if r["what"] == "compile" else f" remat={r['remat']}")
        temp = f"{r['temp_bytes'] / 2**20:.0f}" if r["temp_bytes"] is not None else "n/a"
        print(f"{r['what']:8} {r['layers']:>6} {variant:>28} {r['compile_s']:>10} {temp:>10}")
    print(json.dumps({"bench": "compile", "preset": args.preset, "batch": args.batch,
                      "device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    main()
