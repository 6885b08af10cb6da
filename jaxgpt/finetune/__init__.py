"""Fine-tuning a pretrained run on a labelled task: classification or SFT, LoRA, staged unfreezing."""

from jaxgpt.finetune.loop import evaluate_run, finetune, load_config

__all__ = ["finetune", "evaluate_run", "load_config"]
