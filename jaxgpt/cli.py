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
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 keeps every token")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1, help="samples drawn as one batch")
    gen.add_argument("--checkpoint", default="best", help="'best', 'latest' or a step number")

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
    import jaxgpt

    model = jaxgpt.load(args.run_dir, args.checkpoint)
    prompts = [args.prompt] * args.num_samples
    outputs = model.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for i, text in enumerate(outputs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + text)


def _convert(args) -> None:
    from jaxgpt.convert import hf

    if args.direction == "hf-to-jaxgpt":
        cfg = hf.import_hf(args.hf_dir, args.run_dir, args.overrides)
        m = cfg.model
        print(f"imported {args.hf_dir} -> {args.run_dir} (n_layer={m.n_layer}, n_embd={m.n_embd}, "
              f"block_size={m.block_size}); `jaxgpt train --run-dir {args.run_dir}` fine-tunes with a new optimizer")
    else:
        written = hf.export_hf(args.run_dir, args.hf_dir, args.checkpoint)
        note = "" if any(p.name == "vocab.json" for p in written) else (
            " (no HF tokenizer: this run's tokenizer is not GPT-2's; see the run dir's tokenizer/)")
        print(f"exported {args.run_dir} -> {args.hf_dir}: {', '.join(p.name for p in written)}{note}")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from jaxgpt.errors import JaxgptError

    try:
        {"train": _train, "generate": _generate, "convert": _convert}[args.command](args)
    except JaxgptError as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
