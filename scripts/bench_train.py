"""Training throughput of jaxgpt, optionally against HuggingFace transformers' PyTorch GPT-2 (CPU or GPU).

Measured per workload, for each framework:
  * tokens/s: batch*block tokens / median wall time of one optimizer step (random token ids, random
    weights, fp32, AdamW with global-norm clipping), over `--rounds` x `--steps` timed steps after warmup;
  * MFU: tokens/s * jaxgpt.model.flops_per_token(cfg) / peak, where peak is the fp32 matmul FLOP/s
    measured with jaxgpt.perf.measured_matmul_flops(2048) in the same run (median over the rounds);
  * first step: jaxgpt's trace+compile time plus its first run (PyTorch: its first step);
  * peak RSS: ru_maxrss of the process that ran that framework.

Each framework (and each XLA_FLAGS variant) runs in its own worker process, so RSS is its own and thread
pools never compete; the parent alternates timing rounds between workers, so background load hits all of
them alike. Ratios are jaxgpt / other, of the medians and (paired) the median of per-round ratios.

Workloads:
  small      6 layers, 6 heads, 384 wide, block 256, vocab 8192, batch 8
  gpt2-124m  12 layers, 12 heads, 768 wide, block 1024, vocab 50304 (HF side: 50257), batch 1

Run:
  python scripts/bench_train.py --workload small --torch
  python scripts/bench_train.py --workload gpt2-124m --torch
  python scripts/bench_train.py --workload small --xla-flags="--xla_cpu_experimental_ynn_fusion_type="
  python scripts/bench_train.py --workload small --xla-sweep    # alternates several XLA_FLAGS sets
  python scripts/bench_train.py --workload gpt2-124m --dtype bfloat16 --remat dots_saveable --scan-layers
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_train.py --mesh 2,2,2
Prints a table, then one line `JSON {...}` with every number (also written to --json-out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192, hf_vocab=8192, batch=8,
                  steps=4, rounds=4, warmup=1),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, hf_vocab=50257,
                      batch=1, steps=2, rounds=3, warmup=1),
}

# Named XLA_FLAGS sets from FACTS.md ("Speed on this CPU"), compared by --xla-sweep.
XLA_SWEEP = {
    "xla:default": "",
    "xla:ynn-off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xla:ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "xla:onednn": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise "
                   "--xla_cpu_experimental_ynn_fusion_type="),
}

PROTO = "@@BENCH "  # prefix of the protocol lines a worker writes to stdout


# ----------------------------------------------------------------------------------------------------------
# Worker plumbing (also used by bench_generate.py): a child process answers one JSON line per command.

def _send(obj) -> None:
    sys.stdout.write(PROTO + json.dumps(obj) + "\n")
    sys.stdout.flush()


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def serve(handlers: dict) -> None:
    """Worker main loop: read `name [json-args]` lines from stdin, answer with handler(args) as JSON."""
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            _send({"peak_rss_mib": peak_rss_mib()})
            return
        _send(handlers[cmd](json.loads(arg) if arg else {}))


class Worker:
    """A child process running `script --worker KIND ...`; ask() sends a command and waits for its answer."""

    def __init__(self, label: str, script: str, args: list[str], xla_flags: str | None = None):
        self.label = label
        env = dict(os.environ)
        if xla_flags is not None:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
        self.xla_flags = env.get("XLA_FLAGS", "")
        self.proc = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        self.ready = self._read()  # the worker's setup report

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])
            sys.stderr.write(f"[{self.label}] {line}")
        raise RuntimeError(f"worker {self.label} exited with code {self.proc.wait()}")

    def ask(self, cmd: str, **args):
        self.proc.stdin.write(f"{cmd} {json.dumps(args)}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(timeout=60)
        return out


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Workers

def jax_worker(wl: dict, opts: dict, seed: int = 0) -> None:
    import jax
    import numpy as np
    from flax import linen as nn

    from jaxgpt import sharding
    from jaxgpt.config import MeshConfig, ModelConfig, TrainConfig
    from jaxgpt.model import flops_per_token, param_count
    from jaxgpt.perf import measured_matmul_flops, peak_flops_per_device
    from jaxgpt.train import sharded

    cfg = ModelConfig(vocab_size=wl["vocab_size"], block_size=wl["block_size"], n_layer=wl["n_layer"],
                      n_head=wl["n_head"], n_embd=wl["n_embd"], dropout=0.0, dtype=opts["dtype"],
                      remat=opts["remat"], scan_layers=opts["scan_layers"], attention=opts["attention"])
    tcfg = TrainConfig(steps=10_000, batch_size=wl["batch"], warmup_steps=10)
    mesh_shape = [int(v) for v in opts["mesh"].split(",")]
    n_dev = int(np.prod([v for v in mesh_shape if v > 0])) if -1 not in mesh_shape else jax.device_count()
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), jax.devices()[:n_dev])
    rng = jax.random.key(seed)
    fns = sharded.build(cfg, tcfg, mesh, rng)
    rs = np.random.default_rng(seed)
    B, T = wl["batch"], wl["block_size"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state = fns.init(rng)
        batches = [sharding.global_batch({k: rs.integers(0, cfg.vocab_size, (B, T), dtype=np.int32) for k in "xy"},
                                         mesh, B) for _ in range(2)]
    jax.block_until_ready(state)
    step = fns.step
    # Accelerators: MFU against the vendor bf16 peak of every device; CPUs: the fp32 matmul measured here.
    accel_peak = None if jax.default_backend() == "cpu" else peak_flops_per_device()[0] * mesh.size

    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        compiled = step.lower(state, batches[0], rng).compile()
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    state, metrics = compiled(state, batches[0], rng)
    jax.block_until_ready((state, metrics))
    first_run_s = time.perf_counter() - t1
    n = 1

    def run(steps: int):
        nonlocal state, n
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = compiled(state, batches[n % 2], rng)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t)
            n += 1
        return {"times": times, "loss": float(m["loss"])}

    run(wl["warmup"])
    _send({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "params": param_count(state["params"]), "flops_per_token": flops_per_token(cfg, T),
           "compile_s": compile_s, "first_run_s": first_run_s, "first_step_s": compile_s + first_run_s,
           "rss_after_setup_mib": peak_rss_mib(), "tokens_per_step": B * T})
    serve({"run": lambda a: run(a["steps"]),
           "peak": lambda a: {"flops": accel_peak or measured_matmul_flops(a.get("n", 2048))}})


def torch_model(wl: dict, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = transformers.GPT2Config(vocab_size=wl["hf_vocab"], n_positions=wl["block_size"], n_embd=wl["n_embd"],
                                 n_layer=wl["n_layer"], n_head=wl["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, bos_token_id=wl["hf_vocab"] - 1, eos_token_id=wl["hf_vocab"] - 1)
    model = transformers.GPT2LMHeadModel(hf)
    return model, hf


def torch_worker(wl: dict, threads: int) -> None:
    import numpy as np
    import torch
    import transformers

    model, hf = torch_model(wl, threads)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    rs = np.random.default_rng(0)
    B, T, V = wl["batch"], wl["block_size"], wl["hf_vocab"]
    batches = [{k: torch.from_numpy(rs.integers(0, V, (B, T), dtype=np.int64)) for k in "xy"} for _ in range(2)]
    params = list(model.parameters())

    def one(batch):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["x"]).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), batch["y"].view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    one(batches[0])
    first = time.perf_counter() - t0
    n = 1

    def run(steps: int):
        nonlocal n
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = one(batches[n % 2])
            times.append(time.perf_counter() - t)
            n += 1
        return {"times": times, "loss": loss}

    def peak(a):
        nn_ = a.get("n", 2048)
        x = torch.ones(nn_, nn_)
        x @ x
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            x @ x
            ts.append(time.perf_counter() - t)
        return {"flops": 2 * nn_**3 / median(ts)}

    run(wl["warmup"])
    _send({"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "attn_implementation": getattr(hf, "_attn_implementation", None),
           "params": sum(p.numel() for p in model.parameters()),
           "first_step_s": first, "rss_after_setup_mib": peak_rss_mib(), "tokens_per_step": B * T})
    serve({"run": lambda a: run(a["steps"]), "peak": peak})


# ----------------------------------------------------------------------------------------------------------
# Parent

def bench_workload(name: str, args) -> dict:
    wl = WORKLOADS[name]
    steps = args.steps or wl["steps"]
    rounds = args.rounds or wl["rounds"]
    script = os.path.abspath(__file__)
    common = ["--workload", name, "--mesh", args.mesh, "--dtype", args.dtype, "--remat", args.remat,
              "--attention", args.attention] + (["--scan-layers"] if args.scan_layers else [])
    specs = []  # (label, kind, xla flags)
    if args.xla_sweep:
        specs += [(label, "jax", (args.xla_flags + " " + f).strip()) for label, f in XLA_SWEEP.items()]
    else:
        specs.append(("jaxgpt", "jax", args.xla_flags))
    if args.torch:
        specs.append(("torch", "torch", None))

    workers = []
    try:
        for label, kind, flags in specs:  # started one after the other so setup/compile times are not contended
            print(f"[{name}] starting {label} ...", file=sys.stderr, flush=True)
            w = Worker(label, script, ["--worker", kind, "--threads", str(args.threads), *common], flags)
            workers.append(w)
        times = {w.label: [] for w in workers}
        round_tps = {w.label: [] for w in workers}
        peaks = []
        for r in range(rounds):
            order = workers if r % 2 == 0 else workers[::-1]  # ABBA order
            peaks.append(workers[0].ask("peak")["flops"])
            for w in order:
                out = w.ask("run", steps=steps)
                times[w.label] += out["times"]
                round_tps[w.label].append(w.ready["tokens_per_step"] / median(out["times"]))
                print(f"[{name}] round {r + 1}/{rounds} {w.label:12s} {round_tps[w.label][-1]:9.1f} tok/s "
                      f"loss {out['loss']:.3f}", file=sys.stderr, flush=True)
        finals = {w.label: w.close() for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()

    peak = median(peaks)
    fpt = workers[0].ready["flops_per_token"]
    res = {"workload": name, "options": {k: getattr(args, k) for k in ("mesh", "dtype", "remat", "scan_layers")},
           "config": {k: v for k, v in wl.items() if k not in ("steps", "rounds", "warmup")},
           "steps_per_round": steps, "rounds": rounds, "peak_fp32_matmul_flops": peak,
           "peak_samples": peaks, "flops_per_token": fpt, "frameworks": {}}
    for w in workers:
        ts = times[w.label]
        step_s = median(ts)
        tps = w.ready["tokens_per_step"] / step_s
        # MFU counts the FLOPs of the jaxgpt config (the HF vocab differs by <0.1% for gpt2-124m).
        entry = {"kind": "torch" if w.label == "torch" else "jax", "xla_flags": w.xla_flags if w.label != "torch" else None,
                 "step_s_median": step_s, "step_s_all": ts, "tokens_per_s": tps, "tokens_per_s_rounds": round_tps[w.label],
                 "mfu": tps * fpt / peak, "first_step_s": w.ready["first_step_s"],
                 "peak_rss_mib": finals[w.label]["peak_rss_mib"]}
        entry.update({k: v for k, v in w.ready.items() if k not in entry and k != "flops_per_token"})
        res["frameworks"][w.label] = entry
    base = "torch" if args.torch else None
    if base:
        for label, e in res["frameworks"].items():
            if label == base:
                continue
            b = res["frameworks"][base]
            e["ratio_vs_torch"] = e["tokens_per_s"] / b["tokens_per_s"]
            e["ratio_vs_torch_paired"] = median([a / c for a, c in zip(e["tokens_per_s_rounds"], b["tokens_per_s_rounds"])])
    if args.xla_sweep:
        d = res["frameworks"]["xla:default"]
        for label, e in res["frameworks"].items():
            if e["kind"] == "jax":
                e["ratio_vs_xla_default"] = e["tokens_per_s"] / d["tokens_per_s"]
                e["ratio_vs_xla_default_paired"] = median(
                    [a / c for a, c in zip(e["tokens_per_s_rounds"], d["tokens_per_s_rounds"])])
    return res


def print_table(res: dict) -> None:
    print(f"\n== train: {res['workload']}  {res['config']}")
    print(f"   {res['rounds']} rounds x {res['steps_per_round']} steps; fp32 matmul peak "
          f"{res['peak_fp32_matmul_flops'] / 1e9:.0f} GFLOP/s; {res['flops_per_token'] / 1e6:.1f} MFLOP/token")
    hdr = f"{'':14s}{'tok/s':>9s}{'step s':>9s}{'MFU':>7s}{'1st step s':>11s}{'RSS MiB':>9s}{'vs torch':>10s}{'paired':>8s}"
    sweep = any("ratio_vs_xla_default" in e for e in res["frameworks"].values())
    if sweep:
        hdr += f"{'vs default':>11s}{'paired':>8s}"
    print(hdr)
    for label, e in res["frameworks"].items():
        line = (f"{label:14s}{e['tokens_per_s']:9.1f}{e['step_s_median']:9.3f}{100 * e['mfu']:6.1f}%"
                f"{e['first_step_s']:11.2f}{e['peak_rss_mib']:9.0f}")
        line += f"{e['ratio_vs_torch']:9.2f}x{e['ratio_vs_torch_paired']:7.2f}x" if "ratio_vs_torch" in e else " " * 18
        if sweep and "ratio_vs_xla_default" in e:
            line += f"{e['ratio_vs_xla_default']:10.2f}x{e['ratio_vs_xla_default_paired']:7.2f}x"
        print(line)
    for label, e in res["frameworks"].items():
        if e.get("xla_flags"):
            print(f"   {label}: XLA_FLAGS={e['xla_flags']}")
        if e["kind"] == "jax":
            print(f"   {label}: compile {e['compile_s']:.2f} s + first run {e['first_run_s']:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="small", choices=[*WORKLOADS, "all"])
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (default: per workload)")
    p.add_argument("--rounds", type=int, default=0, help="alternating timing rounds (default: per workload)")
    p.add_argument("--torch", action="store_true", help="also run HF transformers GPT2LMHeadModel, alternated")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS of the jaxgpt worker(s)")
    p.add_argument("--xla-sweep", action="store_true", help=f"alternate jaxgpt under {', '.join(XLA_SWEEP)}")
    p.add_argument("--json-out", default="", help="also write the JSON result here")
    p.add_argument("--mesh", default="1,1,1", help="jaxgpt mesh data,fsdp,tensor (-1: the rest of the devices)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jaxgpt compute dtype")
    p.add_argument("--remat", default="none", choices=["none", "dots_saveable", "full"])
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "blockwise", "cudnn"])
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        wl = WORKLOADS[args.workload]
        opts = {"mesh": args.mesh, "dtype": args.dtype, "remat": args.remat, "scan_layers": args.scan_layers,
                "attention": args.attention}
        jax_worker(wl, opts) if args.worker == "jax" else torch_worker(wl, args.threads)
        return

    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = [bench_workload(n, args) for n in names]
    for r in results:
        print_table(r)
    print(f"load average (1 min) start {load_start[0]:.2f}, end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    out = {"bench": "train", "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - t0,
           "load_avg_start": load_start, "results": results}
    out["load_avg_end"] = os.getloadavg()
    line = json.dumps(out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print("JSON " + line)


if __name__ == "__main__":
    main()
