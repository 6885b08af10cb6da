"""`jaxgpt` command line: train and generate. Errors in user input print one line, not a traceback."""

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
    return parser


def _train(args) -> None:
    from jaxgpt import config as config_lib
    from jaxgpt.train import train

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


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from jaxgpt.errors import JaxgptError

    try:
        {"train": _train, "generate": _generate}[args.command](args)
    except JaxgptError as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
