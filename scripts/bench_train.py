"""Training throughput of jaxgpt, optionally against HuggingFace transformers' PyTorch GPT-2 (CPU or GPU).

Measured per workload, for each framework:
  * tokens/s: batch*block tokens / median wall time of one optimizer step (random token ids, random
    weights, AdamW with global-norm clipping), over `--rounds` x `--steps` timed steps after warmup;
  * MFU: tokens/s * jaxgpt.model.flops_per_token(cfg) / peak, where peak is, on a CPU, the fp32 matmul
    FLOP/s measured with jaxgpt.perf.measured_matmul_flops(2048) in the same run (median over the rounds),
    and on an accelerator the vendor's bf16 peak (jaxgpt.perf.PEAK_BF16);
  * first step: jaxgpt's trace+compile time plus its first run (PyTorch: its first step);
  * peak RSS: ru_maxrss of the process that ran that framework.

Each framework (and each XLA_FLAGS variant) runs in its own worker process, so RSS is its own and thread
pools never compete; the parent alternates timing rounds between workers, so background load hits all of
them alike. Ratios are jaxgpt / other, of the medians and (paired) the median of per-round ratios.

Precision: `--dtype float32,bfloat16` runs one jaxgpt worker per compute dtype (and `--attention auto,xla`
one per attention path: the table names the path `auto` took). PyTorch runs as `--torch-variants`: fp32
(eager float32), bf16 (eager under bf16 autocast), compile, compile-bf16 (torch.compile). The last table
line compares jaxgpt's fastest worker with PyTorch's fastest. PyTorch uses CUDA when it sees a GPU.

Workloads:
  tiny       2 layers, 2 heads, 64 wide, block 128, vocab 256, batch 2 (a seconds-long smoke run)
  small      6 layers, 6 heads, 384 wide, block 256, vocab 8192, batch 8
  gpt2-124m  12 layers, 12 heads, 768 wide, block 1024, vocab 50304 (HF side: 50257), batch 1

Run:
  python scripts/bench_train.py --workload small --torch --dtype float32,bfloat16   # best vs best
  python scripts/bench_train.py --workload gpt2-124m --torch
  python scripts/bench_train.py --workload gpt2-124m --batch 32 --dtype bfloat16 --attention auto,xla \
      --torch --torch-variants bf16,compile-bf16 --parallel-start                    # one NVIDIA GPU
  python scripts/bench_train.py --workload small --xla-flags="--xla_cpu_experimental_ynn_fusion_type="
  python scripts/bench_train.py --workload small --xla-sweep    # alternates several XLA_FLAGS sets
  python scripts/bench_train.py --workload small --loss-chunk 0,128   # unchunked vs chunked LM-head loss
  python scripts/bench_train.py --workload gpt2-124m --dtype bfloat16 --remat dots_saveable --scan-layers
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_train.py --mesh 2,2,2
Prints a table, then one line `JSON {...}` with every number (also written to --json-out FILE).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=256, hf_vocab=256, batch=2,
                 steps=2, rounds=1, warmup=1),
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

TORCH_VARIANTS = ("fp32", "bf16", "compile", "compile-bf16")

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

    def __init__(self, label: str, script: str, args: list[str], xla_flags: str | None = None, wait: bool = True):
        self.label = label
        env = dict(os.environ)
        if xla_flags is not None:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several workers share one accelerator
        self.xla_flags = env.get("XLA_FLAGS", "")
        self.proc = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        self.ready = self._read() if wait else None  # the worker's setup report

    def wait_ready(self) -> None:
        if self.ready is None:
            self.ready = self._read()

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
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from jaxgpt import sharding
    from jaxgpt.attention import choose
    from jaxgpt.config import MeshConfig, ModelConfig, TrainConfig, dtype_of
    from jaxgpt.model import flops_per_token, param_count
    from jaxgpt.perf import measured_matmul_flops, peak_flops_per_device
    from jaxgpt.train import sharded

    cfg = ModelConfig(vocab_size=wl["vocab_size"], block_size=wl["block_size"], n_layer=wl["n_layer"],
                      n_head=wl["n_head"], n_embd=wl["n_embd"], dropout=0.0, dtype=opts["dtype"],
                      remat=opts["remat"], scan_layers=opts["scan_layers"], attention=opts["attention"])
    tcfg = TrainConfig(steps=10_000, batch_size=wl["batch"], warmup_steps=10, loss_chunk=opts["loss_chunk"])
    dtype = dtype_of(cfg.dtype)
    K = cfg.n_embd // cfg.n_head
    attention_path = choose(cfg.attention, cfg.block_size, cfg.block_size, K, dtype, has_mask=False)
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
           "dtype": jnp.dtype(dtype).name, "attention_path": attention_path, "loss_chunk": tcfg.loss_chunk,
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


def torch_worker(wl: dict, threads: int, variant: str = "fp32") -> None:
    import contextlib

    import numpy as np
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf = torch_model(wl, threads)
    model.to(device).train()
    params = list(model.parameters())
    forward = torch.compile(model) if variant.startswith("compile") else model
    # bf16 autocast: matmuls in bf16, weights/optimizer in fp32 (PyTorch's mixed-precision recipe).
    bf16 = variant.endswith("bf16")
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    rs = np.random.default_rng(0)
    B, T, V = wl["batch"], wl["block_size"], wl["hf_vocab"]
    batches = [{k: torch.from_numpy(rs.integers(0, V, (B, T), dtype=np.int64)).to(device) for k in "xy"}
               for _ in range(2)]

    def one(batch):
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = forward(input_ids=batch["x"]).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), batch["y"].view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())  # also waits for the GPU

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
        x = torch.ones(nn_, nn_, device=device)
        x @ x
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            (x @ x).sum().item()
            ts.append(time.perf_counter() - t)
        return {"flops": 2 * nn_**3 / median(ts)}

    run(wl["warmup"])
    _send({"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "variant": variant,
           "attn_implementation": getattr(hf, "_attn_implementation", None),
           "params": sum(p.numel() for p in model.parameters()),
           "first_step_s": first, "rss_after_setup_mib": peak_rss_mib(), "tokens_per_step": B * T})
    serve({"run": lambda a: run(a["steps"]), "peak": peak})


# ----------------------------------------------------------------------------------------------------------
# Parent

def workload(name: str, batch: int = 0) -> dict:
    return {**WORKLOADS[name], **({"batch": batch} if batch else {})}


def worker_specs(args) -> list[tuple[str, str, str | None, list[str]]]:
    """(label, kind, XLA flags, extra worker args) for every worker this run starts."""
    dtypes, attentions, chunks = args.dtype.split(","), args.attention.split(","), args.loss_chunk.split(",")
    specs = []
    for dtype, attention, chunk in itertools.product(dtypes, attentions, chunks):
        label = ":".join(["jaxgpt"] + [dtype] * (len(dtypes) > 1) + [attention] * (len(attentions) > 1)
                         + [f"chunk{chunk}"] * (len(chunks) > 1))
        extra = ["--dtype", dtype, "--attention", attention, "--loss-chunk", chunk]
        if args.xla_sweep:
            specs += [(f"{label}:{flag_label[4:]}" if label != "jaxgpt" else flag_label, "jax",
                       (args.xla_flags + " " + f).strip(), extra) for flag_label, f in XLA_SWEEP.items()]
        else:
            specs.append((label, "jax", args.xla_flags, extra))
    if args.torch:
        specs += [("torch" if v == "fp32" else f"torch:{v}", "torch", None, ["--torch-variants", v])
                  for v in args.torch_variants.split(",")]
    return specs


def bench_workload(name: str, args) -> dict:
    wl = workload(name, args.batch)
    steps = args.steps or wl["steps"]
    rounds = args.rounds or wl["rounds"]
    script = os.path.abspath(__file__)
    common = ["--workload", name, "--batch", str(args.batch), "--mesh", args.mesh, "--remat", args.remat,
              "--threads", str(args.threads)] + (["--scan-layers"] if args.scan_layers else [])
    workers = []
    try:
        # One after the other unless --parallel-start, so setup/compile times are not contended.
        for label, kind, flags, extra in worker_specs(args):
            print(f"[{name}] starting {label} ...", file=sys.stderr, flush=True)
            workers.append(Worker(label, script, ["--worker", kind, *common, *extra], flags,
                                  wait=not args.parallel_start))
        for w in workers:
            w.wait_ready()
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
           "parallel_start": args.parallel_start,
           "config": {k: v for k, v in wl.items() if k not in ("steps", "rounds", "warmup")},
           "steps_per_round": steps, "rounds": rounds, "peak_fp32_matmul_flops": peak,
           "peak_samples": peaks, "flops_per_token": fpt, "frameworks": {}}
    for w in workers:
        ts = times[w.label]
        step_s = median(ts)
        tps = w.ready["tokens_per_step"] / step_s
        # MFU counts the FLOPs of the jaxgpt config (the HF vocab differs by <0.1% for gpt2-124m).
        kind = "torch" if w.label.startswith("torch") else "jax"
        entry = {"kind": kind, "xla_flags": w.xla_flags if kind == "jax" else None,
                 "step_s_median": step_s, "step_s_all": ts, "tokens_per_s": tps, "tokens_per_s_rounds": round_tps[w.label],
                 "mfu": tps * fpt / peak, "first_step_s": w.ready["first_step_s"],
                 "peak_rss_mib": finals[w.label]["peak_rss_mib"]}
        entry.update({k: v for k, v in w.ready.items() if k not in entry and k != "flops_per_token"})
        res["frameworks"][w.label] = entry
    torch_labels = [label for label, e in res["frameworks"].items() if e["kind"] == "torch"]
    base = "torch" if "torch" in torch_labels else (torch_labels or [None])[0]
    if base:
        res["ratio_base"] = base
        for label, e in res["frameworks"].items():
            if label == base:
                continue
            b = res["frameworks"][base]
            e["ratio_vs_torch"] = e["tokens_per_s"] / b["tokens_per_s"]
            e["ratio_vs_torch_paired"] = median([a / c for a, c in zip(e["tokens_per_s_rounds"], b["tokens_per_s_rounds"])])
        best = {kind: max((e["tokens_per_s"], label) for label, e in res["frameworks"].items() if e["kind"] == kind)
                for kind in ("jax", "torch")}
        res["best_vs_best"] = {"jaxgpt": best["jax"][1], "torch": best["torch"][1],
                               "ratio": best["jax"][0] / best["torch"][0]}
    if args.xla_sweep and "xla:default" in res["frameworks"]:
        d = res["frameworks"]["xla:default"]
        for label, e in res["frameworks"].items():
            if e["kind"] == "jax":
                e["ratio_vs_xla_default"] = e["tokens_per_s"] / d["tokens_per_s"]
                e["ratio_vs_xla_default_paired"] = median(
                    [a / c for a, c in zip(e["tokens_per_s_rounds"], d["tokens_per_s_rounds"])])
    return res


def print_table(res: dict) -> None:
    print(f"\n== train: {res['workload']}  {res['config']}")
    print(f"   {res['rounds']} rounds x {res['steps_per_round']} steps; peak {res['peak_fp32_matmul_flops'] / 1e9:.0f} "
          f"GFLOP/s (CPU: fp32 matmul measured; accelerator: vendor bf16); "
          f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token"
          + ("; workers started in parallel (first-step times contended)" if res.get("parallel_start") else ""))
    width = max(14, *(len(label) + 2 for label in res["frameworks"]))
    hdr = (f"{'':{width}s}{'dtype':>13s}{'attn':>10s}{'tok/s':>11s}{'step s':>9s}{'MFU':>7s}{'1st step s':>11s}"
           f"{'RSS MiB':>9s}{'vs ' + res.get('ratio_base', 'torch'):>14s}{'paired':>8s}")
    sweep = any("ratio_vs_xla_default" in e for e in res["frameworks"].values())
    if sweep:
        hdr += f"{'vs default':>11s}{'paired':>8s}"
    print(hdr)
    for label, e in res["frameworks"].items():
        dtype = e.get("dtype") or e.get("variant", "")
        line = (f"{label:{width}s}{dtype:>13s}{e.get('attention_path', ''):>10s}{e['tokens_per_s']:11.1f}"
                f"{e['step_s_median']:9.3f}{100 * e['mfu']:6.1f}%{e['first_step_s']:11.2f}{e['peak_rss_mib']:9.0f}")
        line += f"{e['ratio_vs_torch']:13.2f}x{e['ratio_vs_torch_paired']:7.2f}x" if "ratio_vs_torch" in e else " " * 22
        if sweep and "ratio_vs_xla_default" in e:
            line += f"{e['ratio_vs_xla_default']:10.2f}x{e['ratio_vs_xla_default_paired']:7.2f}x"
        print(line)
    for label, e in res["frameworks"].items():
        if e.get("xla_flags"):
            print(f"   {label}: XLA_FLAGS={e['xla_flags']}")
        if e["kind"] == "jax":
            print(f"   {label}: compile {e['compile_s']:.2f} s + first run {e['first_run_s']:.2f} s")
    if "best_vs_best" in res:
        b = res["best_vs_best"]
        print(f"   best vs best: {b['jaxgpt']} / {b['torch']} = {b['ratio']:.2f}x tokens/s")


def main() -> None:
    from jaxgpt.config import TrainConfig

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
    p.add_argument("--dtype", default="float32",
                   help="jaxgpt compute dtype(s), comma-separated: auto, float32, bfloat16")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: per workload)")
    p.add_argument("--torch-variants", default="fp32,bf16",
                   help=f"with --torch, comma-separated: {', '.join(TORCH_VARIANTS)} (bf16: autocast)")
    p.add_argument("--parallel-start", action="store_true",
                   help="start all workers at once (faster on many cores; first-step times then contend)")
    p.add_argument("--remat", default="none", choices=["none", "dots_saveable", "full"])
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--attention", default="auto",
                   help="jaxgpt attention path(s), comma-separated (jaxgpt/attention.py)")
    p.add_argument("--loss-chunk", default=str(TrainConfig.loss_chunk),
                   help="jaxgpt train.loss_chunk value(s), comma-separated (0: unchunked LM-head loss)")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        wl = workload(args.workload, args.batch)
        opts = {"mesh": args.mesh, "dtype": args.dtype, "remat": args.remat, "scan_layers": args.scan_layers,
                "attention": args.attention, "loss_chunk": int(args.loss_chunk)}
        jax_worker(wl, opts) if args.worker == "jax" else torch_worker(wl, args.threads, args.torch_variants)
        return
    from jaxgpt.attention import ATTENTION

    for value, allowed, flag in ((args.dtype, ("auto", "float32", "bfloat16"), "--dtype"),
                                 (args.attention, ATTENTION, "--attention"),
                                 (args.torch_variants, TORCH_VARIANTS, "--torch-variants")):
        if not set(value.split(",")) <= set(allowed):
            p.error(f"{flag} takes a comma-separated subset of {', '.join(allowed)}; got '{value}'")

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
