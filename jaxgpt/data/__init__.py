"""Text sources, tokenizers and the tokenized-corpus batch stream."""
