"""Checkpoint conversion to and from other libraries (Hugging Face transformers GPT-2)."""

from jaxgpt.convert.hf import (HFCheckpoint, export_hf, from_pretrained, hf_to_params, import_hf,
                               load_hf_tokenizer, params_to_hf)

__all__ = ["HFCheckpoint", "export_hf", "from_pretrained", "hf_to_params", "import_hf", "load_hf_tokenizer",
           "params_to_hf"]
