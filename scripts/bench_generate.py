"""Greedy generation speed of jaxgpt, optionally against HuggingFace transformers' PyTorch GPT-2 generate().

Measured per workload and batch size (`--batches`, default 1 and 8), random weights, random prompt ids,
greedy, in `--dtype` (float32 by default; bfloat16: weights and compute in bf16 on both sides):
  * TTFT (time to first token): wall time of a whole generate call with max_new_tokens=1 (prefill of the
    prompt + sampling one token). jaxgpt: jaxgpt.generate.generate_ids, compiled beforehand; HF:
    model.generate(use_cache=True, do_sample=False, max_new_tokens=1, min_new_tokens=1).
  * end-to-end new tokens/s: batch * new_tokens / wall time of a generate call with max_new_tokens=new_tokens
    (min_new_tokens too on the HF side, eos never stops jaxgpt: eos_id=-1);
  * decode tokens/s: batch * (new_tokens - 1) / (that time - TTFT), i.e. without the prefill;
  * jaxgpt compile: first-call time minus the median timed call (one compilation per batch size and
    max_new_tokens; both the 1-token and the N-token decoders are compiled before timing).
Medians over `--rounds` x `--reps` calls; jaxgpt and PyTorch run in separate worker processes and the parent
alternates rounds between them (see bench_train.py, whose worker plumbing this script imports).

Workloads (prompt 32 tokens, 128 new tokens by default):
  tiny       2 layers, 2 heads, 64 wide, block 128, vocab 256
  small      6 layers, 6 heads, 384 wide, block 256, vocab 8192
  gpt2-124m  12 layers, 12 heads, 768 wide, block 1024, vocab 50304 (HF side: 50257)

Run:
  python scripts/bench_generate.py --workload small --torch
  python scripts/bench_generate.py --workload all --torch --json-out gen.json
  python scripts/bench_generate.py --xla-flags="--xla_cpu_experimental_ynn_fusion_type="
  python scripts/bench_generate.py --workload gpt2-124m --torch --dtype bfloat16 --batches 1,8,64 \\
      --new-tokens 256                                  # one GPU (PyTorch uses CUDA when it sees it)
Prints a table, then one line `JSON {...}` with every number (also written to --json-out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import WORKLOADS, Worker, _send, median, peak_rss_mib, serve, torch_model  # noqa: E402

BATCHES = (1, 8)  # default --batches


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rs = np.random.default_rng(seed)
    return rs.integers(0, vocab, (batch, length)).tolist()


def jax_worker(wl: dict, prompt_len: int, new_tokens: int, batches=BATCHES, dtype: str = "float32") -> None:
    import jax

    from jaxgpt.config import ModelConfig
    from jaxgpt.generate import SamplingParams, generate_ids
    from jaxgpt.model import init_params

    cfg = ModelConfig(vocab_size=wl["vocab_size"], block_size=wl["block_size"], n_layer=wl["n_layer"],
                      n_head=wl["n_head"], n_embd=wl["n_embd"], dropout=0.0, dtype=dtype, param_dtype=dtype)
    params = init_params(cfg, jax.random.key(0))
    prompts = {b: prompts_for(b, prompt_len, wl["hf_vocab"]) for b in batches}

    def call(b: int, n: int) -> float:
        t = time.perf_counter()
        out = generate_ids(params, cfg, prompts[b], n, eos_id=-1, n_vocab=wl["hf_vocab"],
                           sampling=SamplingParams(0.0), seed=0)
        dt = time.perf_counter() - t
        assert len(out) == b and all(len(r) == n for r in out)
        return dt

    first = {}
    for b in batches:
        for n in (1, new_tokens):
            first[f"b{b}_n{n}"] = call(b, n)
    _send({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "first_call_s": first,
           "rss_after_setup_mib": peak_rss_mib()})
    serve({"run": lambda a: {f"b{b}_n{n}": [call(b, n) for _ in range(a["reps"])]
                             for b in batches for n in (1, new_tokens)}})


def torch_worker(wl: dict, prompt_len: int, new_tokens: int, threads: int, batches=BATCHES,
                 dtype: str = "float32") -> None:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf = torch_model(wl, threads)
    model.to(device, getattr(torch, dtype)).eval()
    prompts = {b: torch.tensor(prompts_for(b, prompt_len, wl["hf_vocab"]), device=device) for b in batches}

    @torch.inference_mode()
    def call(b: int, n: int) -> float:
        ids = prompts[b]
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, pad_token_id=hf.eos_token_id)
        out = out.cpu()  # waits for the GPU
        dt = time.perf_counter() - t
        assert out.shape == (b, prompt_len + n), out.shape
        return dt

    first = {}
    for b in batches:
        for n in (1, new_tokens):
            first[f"b{b}_n{n}"] = call(b, n)
    _send({"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "attn_implementation": getattr(hf, "_attn_implementation", None), "first_call_s": first,
           "rss_after_setup_mib": peak_rss_mib()})
    serve({"run": lambda a: {f"b{b}_n{n}": [call(b, n) for _ in range(a["reps"])]
                             for b in batches for n in (1, new_tokens)}})


def bench_workload(name: str, args) -> dict:
    script = os.path.abspath(__file__)
    common = ["--workload", name, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
              "--batches", args.batches, "--dtype", args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    specs = [("jaxgpt", "jax", args.xla_flags)] + ([("torch", "torch", None)] if args.torch else [])
    workers = []
    try:
        for label, kind, flags in specs:
            print(f"[{name}] starting {label} ...", file=sys.stderr, flush=True)
            workers.append(Worker(label, script, ["--worker", kind, "--threads", str(args.threads), *common], flags,
                                  wait=not args.parallel_start))
        for w in workers:
            w.wait_ready()
        samples = {w.label: {} for w in workers}
        for r in range(args.rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                for key, ts in w.ask("run", reps=args.reps).items():
                    samples[w.label].setdefault(key, []).extend(ts)
                print(f"[{name}] round {r + 1}/{args.rounds} {w.label}: " + ", ".join(
                    f"{k} {median(v) * 1e3:.0f} ms" for k, v in samples[w.label].items()), file=sys.stderr, flush=True)
        finals = {w.label: w.close() for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()

    N = args.new_tokens
    res = {"workload": name, "prompt_len": args.prompt_len, "new_tokens": N, "rounds": args.rounds, "reps": args.reps,
           "batches": batches, "dtype": args.dtype,
           "config": {k: v for k, v in WORKLOADS[name].items() if k not in ("steps", "rounds", "warmup", "batch")},
           "frameworks": {}}
    for w in workers:
        e = {"peak_rss_mib": finals[w.label]["peak_rss_mib"], "samples_s": samples[w.label]}
        e.update({k: v for k, v in w.ready.items() if k != "first_call_s"})
        for b in batches:
            ttft = median(samples[w.label][f"b{b}_n1"])
            total = median(samples[w.label][f"b{b}_n{N}"])
            e[f"b{b}"] = {"ttft_s": ttft, "total_s": total, "e2e_tokens_per_s": b * N / total,
                          # nan when noise makes the median prefill-only call the slower one (tiny runs)
                          "decode_tokens_per_s": b * (N - 1) / (total - ttft) if total > ttft else float("nan"),
                          "first_call_s": w.ready["first_call_s"][f"b{b}_n{N}"],
                          "first_call_ttft_s": w.ready["first_call_s"][f"b{b}_n1"]}
            if w.label == "jaxgpt":
                e[f"b{b}"]["compile_s"] = e[f"b{b}"]["first_call_s"] - total
                e[f"b{b}"]["compile_ttft_s"] = e[f"b{b}"]["first_call_ttft_s"] - ttft
        res["frameworks"][w.label] = e
    if args.torch:
        j, t = res["frameworks"]["jaxgpt"], res["frameworks"]["torch"]
        res["ratios_jaxgpt_over_torch"] = {
            f"b{b}": {"e2e_tokens_per_s": j[f"b{b}"]["e2e_tokens_per_s"] / t[f"b{b}"]["e2e_tokens_per_s"],
                      "decode_tokens_per_s": j[f"b{b}"]["decode_tokens_per_s"] / t[f"b{b}"]["decode_tokens_per_s"],
                      "ttft_speedup": t[f"b{b}"]["ttft_s"] / j[f"b{b}"]["ttft_s"]} for b in batches}
    return res


def print_table(res: dict) -> None:
    print(f"\n== generate: {res['workload']}  {res['config']}  prompt {res['prompt_len']}, "
          f"{res['new_tokens']} new tokens, greedy, {res['dtype']}; {res['rounds']} rounds x {res['reps']} reps")
    print(f"{'':8s}{'batch':>6s}{'TTFT ms':>9s}{'total s':>9s}{'e2e tok/s':>11s}{'decode tok/s':>14s}"
          f"{'1st call s':>12s}{'RSS MiB':>9s}")
    for label, e in res["frameworks"].items():
        for b in res["batches"]:
            x = e[f"b{b}"]
            print(f"{label:8s}{b:6d}{x['ttft_s'] * 1e3:9.1f}{x['total_s']:9.3f}{x['e2e_tokens_per_s']:11.1f}"
                  f"{x['decode_tokens_per_s']:14.1f}{x['first_call_s']:12.2f}{e['peak_rss_mib']:9.0f}")
    if "ratios_jaxgpt_over_torch" in res:
        for b, r in res["ratios_jaxgpt_over_torch"].items():
            print(f"jaxgpt/torch batch {b[1:]}: decode {r['decode_tokens_per_s']:.2f}x, e2e {r['e2e_tokens_per_s']:.2f}x, "
                  f"TTFT {r['ttft_speedup']:.2f}x faster")
    j = res["frameworks"]["jaxgpt"]
    print("jaxgpt compile (first call - median): " + ", ".join(
        f"batch {b}: {j[f'b{b}']['compile_s']:.2f} s (+{j[f'b{b}']['compile_ttft_s']:.2f} s for the 1-token decoder)"
        for b in res["batches"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="small", choices=[*WORKLOADS, "all"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--reps", type=int, default=2, help="timed calls per (batch, length) per round")
    p.add_argument("--torch", action="store_true", help="also run HF transformers generate(), alternated")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS of the jaxgpt worker")
    p.add_argument("--json-out", default="", help="also write the JSON result here")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    p.add_argument("--parallel-start", action="store_true", help="start the workers at once (many cores)")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        wl = WORKLOADS[args.workload]
        batches = [int(b) for b in args.batches.split(",")]
        if args.worker == "jax":
            jax_worker(wl, args.prompt_len, args.new_tokens, batches, args.dtype)
        else:
            torch_worker(wl, args.prompt_len, args.new_tokens, args.threads, batches, args.dtype)
        return

    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    load_start, t0 = os.getloadavg(), time.perf_counter()
    results = [bench_workload(n, args) for n in names]
    for r in results:
        print_table(r)
    print(f"load average (1 min) start {load_start[0]:.2f}, end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    out = {"bench": "generate", "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - t0,
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "results": results}
    line = json.dumps(out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print("JSON " + line)


if __name__ == "__main__":
    main()
