"""`jaxgpt` command line: train, generate and convert. Errors in user input print one line, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgpt", description="GPT training and inference in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pretrain (or resume) a GPT on a text corpus")
    train.add_argument("--config", help="YAML config (optional when resuming a run dir)")
    train.add_argument("--run-dir", required=True, help="where checkpoints, logs and the tokenizer go")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=2000 model.n_layer=4")
    train.add_argument("--coordinator", help="multi-host: host:port of process 0 (TPU VMs need none of these)")
    train.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    train.add_argument("--process-id", type=int, help="multi-host: this process's index")

    gen = sub.add_parser("generate", help="sample text from a trained run dir")
    gen.add_argument("--run-dir", required=True)
    gen.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="past the context the window slides")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 keeps every token")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1, help="samples drawn as one batch")
    gen.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 is off)")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeating n-grams of this size")
    gen.add_argument("--min-new-tokens", type=int, default=0, help="end-of-text is banned before this many")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (deterministic)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.add_argument("--no-slide", action="store_true",
                     help="fail instead of sliding the window when prompt + new tokens exceed the context")

    chat = sub.add_parser("chat", help="talk to a run dir's model (one message per line on stdin)")
    chat.add_argument("--run-dir", required=True)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, help="per reply (default: 128, or half the context if smaller)")
    chat.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")

    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    ppl.add_argument("--run-dir", required=True)
    ppl.add_argument("--file", required=True, help="UTF-8 text file")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: the window)")
    ppl.add_argument("--window", type=int, help="tokens per window (default: block_size)")
    ppl.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")

    ft = sub.add_parser("finetune", help="fine-tune a pretrained run dir on a labelled task")
    ft.add_argument("--config", help="fine-tune YAML (train:, finetune:, model.lora_*)")
    ft.add_argument("--init-from", help="the pretrained run dir")
    ft.add_argument("--run-dir", required=True, help="new run dir for the fine-tune")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.patience=3 model.lora_rank=8")

    ev = sub.add_parser("evaluate", help="evaluate a fine-tune run dir's best checkpoint on a split")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")

    srv = sub.add_parser("serve", help="serve a run dir or an exported artifact over an OpenAI-compatible HTTP "
                         "API, with a chat page at /")
    what = srv.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-dir")
    what.add_argument("--exported", metavar="DIR", help="a `jaxgpt export` folder, served with JAX alone (no Flax; "
                      "no logprobs)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean otherwise)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--checkpoint", help="'best' (the default), 'latest' or a step number (run dirs only)")
    srv.add_argument("--quantize", choices=("int8",), help="int8 weight-only quantization (run dirs only; "
                     "export with --quantize int8 instead)")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together on the device")
    srv.add_argument("--batching", choices=("continuous", "dynamic", "off"), default="continuous",
                     help="continuous: requests join and leave the running decode between chunks (run dirs; an "
                     "export batches dynamically); dynamic: a batch runs to its end; off: one request at a time")
    srv.add_argument("--prefix-cache-mb", type=float, help="memory for finished requests' KV caches, reused by "
                     "prompts that extend them (a chat's next turn); 0 turns it off (default 256; continuous only)")
    srv.add_argument("--model-name", help="the model id clients send (default: the run dir's name)")
    srv.add_argument("--stream-chunk", type=int, default=8, help="tokens per decode chunk (stream granularity)")

    exp = sub.add_parser("export", help="write a self-contained inference artifact (jax.export + safetensors)")
    exp.add_argument("--run-dir", required=True)
    exp.add_argument("--out", required=True, help="new or empty output folder (or an earlier export, replaced)")
    exp.add_argument("--force", action="store_true", help="replace any other folder (never one holding a run dir)")
    exp.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")
    exp.add_argument("--quantize", choices=["int8"], help="store int8 weights (dequantized inside the program)")
    exp.add_argument("--batch-sizes", default="1,8", help="used only where a symbolic batch size does not export")
    exp.add_argument("--prompt-buckets", help="prompt lengths, padded up to the next bucket (default: 16,64 where "
                     "they fit the context with --max-new-tokens)")
    exp.add_argument("--max-new-tokens", type=int, help="per program call (default: 128, or half the context if "
                     "smaller); longer generations slide the window")

    al = sub.add_parser("active", help="active learning: fine-tune, query the most useful labels, repeat")
    al.add_argument("--config", help="active-learning YAML (train:, finetune:, active:)")
    al.add_argument("--init-from", help="the pretrained run dir")
    al.add_argument("--run-dir", required=True, help="run dir for the rounds (running again resumes)")
    al.add_argument("--rounds", type=int, help="fine-tunes in all; a query follows each but the last")
    al.add_argument("--query-size", type=int, help="labels asked for per round")
    al.add_argument("--strategy", help="random | least_confidence | margin | entropy | bald")
    al.add_argument("--annotate-file", help="write each query here for a person to label; rerun once filled in")
    al.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. active.diversity=4 seed=1")

    plot = sub.add_parser("plot", help="learning curves of several `jaxgpt active` run dirs on one PNG")
    plot.add_argument("--curves", nargs="+", required=True, metavar="DIR", help="run dirs of `jaxgpt active`")
    plot.add_argument("--out", default="curves.png", help="PNG to write")
    plot.add_argument("--target", type=float, help="also report the labels each strategy needs to reach this")
    plot.add_argument("--metric", default="test_accuracy", help="metric for --target (and the first panel)")

    rl = sub.add_parser("rl", help="RL fine-tuning (GRPO) of a pretrained run dir against a reward")
    rl.add_argument("--config", help="RL YAML (train:, rl:)")
    rl.add_argument("--init-from", help="the pretrained run dir (initial policy and frozen reference)")
    rl.add_argument("--run-dir", required=True, help="new run dir for the RL run (running again resumes)")
    rl.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rl.reward=rhyme rl.kl_coef=0.1")

    dpo = sub.add_parser("dpo", help="DPO from preference pairs (JSONL of prompt, chosen, rejected)")
    dpo.add_argument("--config", help="DPO YAML (train:, rl:)")
    dpo.add_argument("--init-from", help="the pretrained run dir (initial policy and frozen reference)")
    dpo.add_argument("--run-dir", required=True)
    dpo.add_argument("--data", help="preference pairs JSONL (or rl.data=...)")
    dpo.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rl.dpo_beta=0.2 train.steps=100")

    conv = sub.add_parser("convert", help="convert GPT-2 checkpoints to and from Hugging Face transformers")
    direction = conv.add_subparsers(dest="direction", required=True)
    h2j = direction.add_parser("hf-to-jaxgpt", help="make a run dir from an HF folder (model.safetensors)")
    h2j.add_argument("--hf-dir", required=True, help="folder written by transformers' save_pretrained")
    h2j.add_argument("--run-dir", required=True, help="new run dir; `jaxgpt train` there fine-tunes from it")
    h2j.add_argument("overrides", nargs="*", metavar="key=value", help="data/train settings for fine-tuning")
    j2h = direction.add_parser("jaxgpt-to-hf", help="write a run dir's checkpoint as an HF GPT-2 folder")
    j2h.add_argument("--run-dir", required=True)
    j2h.add_argument("--hf-dir", required=True, help="output folder for GPT2LMHeadModel.from_pretrained")
    j2h.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")
    j2h.add_argument("--force", action="store_true", help="replace a non-empty --hf-dir (never one holding a run dir)")
    return parser


def _train(args) -> None:
    from jaxgpt import config as config_lib
    from jaxgpt import distributed
    from jaxgpt.train import train

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    cfg = None
    if args.config or args.overrides:
        if not args.config and not os.path.isfile(os.path.join(args.run_dir, "config.json")):
            from jaxgpt.errors import JaxgptError

            raise JaxgptError("pass --config FILE to start a new run (overrides alone need an existing run dir)")
        if args.config:
            cfg = config_lib.load(args.config, args.overrides)
        else:
            saved = config_lib.read_json_flat(os.path.join(args.run_dir, "config.json"))
            cfg = config_lib.load(None, {**saved, **config_lib.parse_overrides(args.overrides)})
    summary = train(cfg, args.run_dir)
    import jax

    if jax.process_index() != 0:
        return
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if k in ("step", "train_loss", "val_loss", "tokens_per_sec")}
    print(f"done: {shown}; run dir {args.run_dir}")


def _generate(args) -> None:
    from jaxgpt.api import load

    model = load(args.run_dir, args.checkpoint)
    prompts = [args.prompt] * args.num_samples
    controls = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=args.stop, repetition_penalty=args.repetition_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                    num_beams=args.num_beams, slide=not args.no_slide)
    if args.stream:
        if args.num_samples > 1:
            from jaxgpt.errors import JaxgptError

            raise JaxgptError("--stream prints one sample; drop --num-samples")
        print(args.prompt, end="", flush=True)
        for piece in model.generate(args.prompt, stream=True, **controls):
            print(piece, end="", flush=True)
        print()
        return
    outputs = model.generate(prompts, **controls)
    for i, text in enumerate(outputs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + text)


def _finetune(args) -> None:
    from jaxgpt.finetune import finetune, load_config

    summary = finetune(load_config(args.config, args.overrides, args.init_from), args.run_dir)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if not k.startswith("val_")}
    print(f"done: {shown}; run dir {args.run_dir}")


def _evaluate(args) -> None:
    from jaxgpt.finetune import evaluate_run

    metrics = evaluate_run(args.run_dir, args.split, args.checkpoint)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def _chat(args) -> None:
    from jaxgpt.api import load

    model = load(args.run_dir, args.checkpoint)
    session = model.chat_session(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: one message per line; /reset forgets the conversation, /exit or Ctrl-D quits")
    turn = 0
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if text:
            reply = session.send(text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                 seed=args.seed + turn)
            print(f"assistant> {reply}", flush=True)
            turn += 1


def _perplexity(args) -> None:
    from jaxgpt.api import load
    from jaxgpt.errors import JaxgptError

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxgptError(f"cannot read {args.file} as UTF-8 text: {e}") from None
    model = load(args.run_dir, args.checkpoint)
    r = model.perplexity(text, stride=args.stride, window=args.window)
    w = r.windows[0]
    print(f"perplexity {r.perplexity:.4f} (nll {r.nll:.4f} nats/token over {r.n_scored} tokens; "
          f"{len(r.windows)} windows of <= {w.end - w.begin} tokens)")
    print("JSON " + __import__("json").dumps({"perplexity": r.perplexity, "nll": r.nll, "n_scored": r.n_scored,
                                              "windows": len(r.windows)}))


def _serve(args) -> None:
    from jaxgpt.errors import JaxgptError

    if args.max_batch < 1 or args.stream_chunk < 1:
        raise JaxgptError("--max-batch and --stream-chunk must be positive")
    if args.prefix_cache_mb is not None and args.prefix_cache_mb < 0:
        raise JaxgptError(f"--prefix-cache-mb must be >= 0 (0 turns the cache off), got {args.prefix_cache_mb}")
    if args.exported and (args.checkpoint or args.quantize):
        raise JaxgptError("--checkpoint and --quantize apply to --run-dir; an export holds one checkpoint (export "
                          "it with --quantize int8 for int8 weights)")
    from jaxgpt.serve import serve

    serve(args.run_dir, args.host, args.port, args.checkpoint or "best", args.quantize, args.max_batch,
          args.batching, args.model_name, chunk=args.stream_chunk, exported=args.exported,
          prefix_cache_mb=args.prefix_cache_mb)


def _export(args) -> None:
    from jaxgpt.api import load
    from jaxgpt.export import export_model

    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    out = export_model(load(args.run_dir, args.checkpoint), args.out, batch_sizes=ints(args.batch_sizes),
                       prompt_buckets=ints(args.prompt_buckets or ""), max_new_tokens=args.max_new_tokens,
                       quantize=args.quantize, force=args.force)
    print(f"exported {args.run_dir} -> {out}; load with jaxgpt.load_exported('{out}')")


def _rl(args) -> None:
    from jaxgpt import rl

    extra = {"rl.algorithm": "dpo", **({"rl.data": args.data} if args.data else {})} if args.command == "dpo" else {}
    summary = rl.run(rl.load_config(args.config, args.overrides, args.init_from, extra), args.run_dir)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if k in ("step", "loss", "kl", "reward", "eval_reward_before", "eval_reward", "eval_kl", "val_loss",
                      "val_reward_accuracy")}
    print(f"done: {shown}; run dir {args.run_dir}")


def _active(args) -> None:
    from jaxgpt import active

    flags = {"rounds": args.rounds, "query_size": args.query_size, "strategy": args.strategy,
             "annotate_file": args.annotate_file}
    overrides = args.overrides + [f"active.{k}={v}" for k, v in flags.items() if v is not None]
    curve = active.run(*active.load_config(args.config, overrides, args.init_from), args.run_dir)
    for r in curve:
        print(f"round {r['round']}: {r['labelled']} labels  val acc {r['val_accuracy']:.4f} macro-F1 "
              f"{r['val_macro_f1']:.4f}  test acc {r.get('test_accuracy', float('nan')):.4f} macro-F1 "
              f"{r.get('test_macro_f1', float('nan')):.4f}")
    print(f"curve: {os.path.join(args.run_dir, 'active_curve.jsonl')}")


def _plot(args) -> None:
    from jaxgpt.active import plot

    metrics = (args.metric, *[m for m in ("test_accuracy", "test_macro_f1") if m != args.metric])
    out = plot.plot_curves(args.curves, args.out, metrics, args.target)
    print(f"wrote {out}")
    if args.target is not None:
        rows = plot.summarize([plot.read_curve(d) for d in args.curves], args.metric, args.target)
        for row in rows:
            print(f"{row['strategy']}: seeds {row['seeds']}, final {args.metric} {row[f'final_{args.metric}']:.4f}, "
                  f"labels to reach {args.target}: mean curve {row['labels_mean_curve']}, "
                  f"per seed {row['labels_per_seed']}")
        print("JSON " + __import__("json").dumps(rows))


def _convert(args) -> None:
    from jaxgpt.convert import hf

    if args.direction == "hf-to-jaxgpt":
        cfg = hf.import_hf(args.hf_dir, args.run_dir, args.overrides)
        m = cfg.model
        print(f"imported {args.hf_dir} -> {args.run_dir} (n_layer={m.n_layer}, n_embd={m.n_embd}, "
              f"block_size={m.block_size}); `jaxgpt train --run-dir {args.run_dir}` fine-tunes with a new optimizer")
    else:
        written = hf.export_hf(args.run_dir, args.hf_dir, args.checkpoint, args.force)
        note = "" if any(p.name == "vocab.json" for p in written) else (
            f" (this run's tokenizer is not GPT-2's, so transformers cannot load it: it is kept in "
            f"{hf.JAXGPT_TOKENIZER_DIR}/ for `jaxgpt convert hf-to-jaxgpt`)")
        print(f"exported {args.run_dir} -> {args.hf_dir}: {', '.join(p.name for p in written)}{note}")


def _quiet_closed_loop(hook):
    """After a failed save, tensorstore callbacks hit Orbax's closed event loop and print it: noise, not news."""

    def quiet(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)

    return quiet


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0, 2 for bad input, 130/143 when SIGINT/SIGTERM stopped it (after saving)."""
    args = _build_parser().parse_args(argv)
    import logging

    from jaxgpt import cli_values, files

    logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax logs each save error it also raises to us
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    from jaxgpt.errors import JaxgptError
    from jaxgpt.train import signals

    signals.reset_caught()
    try:
        cli_values.check(args)
        {"train": _train, "generate": _generate, "convert": _convert, "finetune": _finetune,
         "evaluate": _evaluate, "chat": _chat, "perplexity": _perplexity, "serve": _serve,
         "export": _export, "rl": _rl, "dpo": _rl,
         "active": _active, "plot": _plot}[args.command](args)
    except JaxgptError as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (the last saved checkpoint stays good)
        print(f"\njaxgpt {args.command}: interrupted", file=sys.stderr)
        return signals.exit_status("SIGINT")
    except Exception as e:
        line = files.os_error_message(e)  # disk full / permission denied: one line naming the path and the fix
        if line is None:
            raise
        print(f"jaxgpt {args.command}: error: {line}", file=sys.stderr, flush=True)
        if argv is None:  # the real command line: Orbax's threads echo the same error again while exiting
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        return 2
    caught = signals.caught_signal()
    return signals.exit_status(caught) if caught and args.command != "serve" else 0


if __name__ == "__main__":
    sys.exit(main())
