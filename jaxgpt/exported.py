"""Run an exported artifact (see `jaxgpt.export`) with JAX alone: no Flax, no jaxgpt model code.

    model = jaxgpt.load_exported("exported/shakespeare")
    model.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=40, seed=1)
    model.score("The capital of France is", " Paris")  # (sum of log-probs, is greedy), as LanguageModel.score

Artifacts exported before scoring programs existed (manifest format 1) generate only; scoring them asks
for a re-export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from jaxgpt import conversation
from jaxgpt.data import tokenizers
from jaxgpt.errors import JaxgptError
from jaxgpt.sampling import SamplingParams, cut_at_eos, left_pad
from jaxgpt.score_rows import Score, TokenLogprobs, batched_logprobs, check_rows, score_texts
from jaxgpt.sliding import rounds

FORMAT_VERSION = 2  # 2: scoring programs ("score_programs"); format 1 artifacts generate only


class ExportedModel:
    def __init__(self, folder: str | Path):
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            raise JaxgptError(f"'{folder}' is not an exported jaxgpt model (no manifest.json); create one with "
                              "`jaxgpt export`")
        self.manifest = m = json.loads(manifest_file.read_text())
        if m.get("format", 1) > FORMAT_VERSION:
            raise JaxgptError(f"'{folder}' was exported by a newer jaxgpt (format {m['format']}; this one reads up to "
                              f"{FORMAT_VERSION}); upgrade jaxgpt or re-export the model with this version")
        self.weights = {k: jax.device_put(v) for k, v in load_file(str(folder / "weights.safetensors")).items()}
        if sorted(self.weights) != m["weights"]:
            raise JaxgptError(f"'{folder}/weights.safetensors' does not match its manifest; re-export the model")
        self.tokenizer = tokenizers.load(folder / "tokenizer")
        self.template = conversation.for_run(folder)  # the run dir's chat template (DEFAULT in older exports)
        self.programs = {(p["prompt_bucket"], p["batch"]): (folder / p["file"]) for p in m["programs"]}
        self.score_programs = {(p["length"], p["batch"]): (folder / p["file"]) for p in m.get("score_programs", [])}
        self._loaded: dict = {}

    def _program(self, bucket: int, batch: int, programs: dict | None = None):
        programs = self.programs if programs is None else programs
        key = (bucket, None) if (bucket, None) in programs else (bucket, batch)
        if key not in programs:
            sizes = sorted({b for _, b in programs if b})
            raise JaxgptError(f"this export has no program for batch {batch}; exported batch sizes: {sizes}")
        if programs[key] not in self._loaded:
            self._loaded[programs[key]] = jax.export.deserialize(bytearray(programs[key].read_bytes()))
        return self._loaded[programs[key]]

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    @property
    def batch_sizes(self) -> list[int] | None:
        """The batch sizes its programs take; None where every program takes any (a symbolic batch)."""
        return sorted({b for _, b in self.programs if b}) or None

    @property
    def can_score(self) -> bool:
        """Whether it holds scoring programs (exports made before they existed do not)."""
        return bool(self.score_programs)

    def token_logprobs(self, rows: list[list[int]], top_n: int = 0, batch_size: int = 8) -> list[TokenLogprobs]:
        """Per-token log-probabilities of each row of token ids, as `jaxgpt.scoring.token_logprobs` gives them."""
        if not self.can_score:
            raise JaxgptError("this export holds no scoring program (it was made before jaxgpt exported one); "
                              "re-export it with `jaxgpt export` to score or get logprobs")
        m = self.manifest
        check_rows(rows, m["block_size"], top_n, min(m["n_vocab"], m["score_top"]))
        sizes = sorted({b for _, b in self.score_programs if b})
        padded_rows = (lambda n: next(s for s in sizes if s >= n)) if sizes else (lambda n: n)
        batch_size = min(batch_size, max(sizes)) if sizes else batch_size

        def run(tokens_BxT: np.ndarray):
            program = self._program(tokens_BxT.shape[1], tokens_BxT.shape[0], self.score_programs)
            return jax.device_get(program.call(self.weights, tokens_BxT, np.int32(m["n_vocab"])))

        return batched_logprobs(run, rows, m["block_size"], top_n, batch_size, padded_rows)

    def score(self, context: str | list[str], continuation: str | list[str]) -> Score | list[Score]:
        """log p(continuation | context) summed over its tokens, and whether greedy decoding gives it
        (`jaxgpt.LanguageModel.score`: strings in, one Score out; lists in, lists out)."""
        return score_texts(self.tokenizer, self.block_size, context, continuation, self.token_logprobs)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New ids per prompt (keywords as `stream_ids`, without `chunk`)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for new in self.stream_ids(prompts, max_new_tokens, **kwargs):
            for row, toks in zip(outputs, new):
                row += toks
        return outputs

    def stream_ids(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
                   seed: int | Sequence[int] = 0, stop_ids: Sequence[Sequence[int]] = (), slide: bool = True,
                   chunk: int | None = None) -> Iterator[list[list[int]]]:
        """Each row's new ids after every program call ([] for a row that has ended).

        One call makes up to the exported max_new_tokens, or `chunk` tokens (a stream's granularity: each
        call re-reads prompt + output so far, while that fits the largest prompt bucket). Past the exported
        lengths the window slides as the live model's does: the newest tokens (up to the largest prompt
        bucket, or half the context) become the next prompt; `slide=False` raises instead."""
        m = self.manifest
        eos, limit, largest = m["eos_id"], m["max_new_tokens"], max(b for b, _ in self.programs)
        if max_new_tokens <= 0:
            raise JaxgptError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if chunk is not None and chunk <= 0:
            raise JaxgptError(f"chunk must be positive, got {chunk}")
        prompts = [list(p) if len(p) else [eos] for p in prompts]
        longest = max(len(p) for p in prompts)
        if not slide and (max_new_tokens > limit or longest > largest):
            raise JaxgptError(f"this export takes prompts of up to {largest} tokens and max_new_tokens up to {limit} "
                              f"(got {longest} and {max_new_tokens}); let the window slide (slide=True, the "
                              "default) or re-export with larger --prompt-buckets/--max-new-tokens")
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, min_new_tokens)
        outputs: list[list[int]] = [[] for _ in prompts]
        # A chunked stream re-reads its whole text while it fits; otherwise only the first call does.
        for plan in rounds(prompts, outputs, max_new_tokens, sampling, seed, block_size=m["block_size"],
                           window=largest, most=min(limit, chunk or limit), reread=chunk is not None):
            new, done = self._decode(plan.contexts, plan.n, plan.keys_B, plan.sampling, stop_ids)
            plan.record(new, done)
            out: list[list[int]] = [[] for _ in prompts]
            for b, toks in zip(plan.rows, new):
                out[b] = toks
            yield out

    def _decode(self, prompts, n, keys_B, sampling: SamplingParams, stop_ids) -> tuple[list[list[int]], list[bool]]:
        """One exported program call: (new ids cut at end-of-text, done flags) for prompts that fit a bucket."""
        m = self.manifest
        eos = m["eos_id"]
        buckets = sorted({b for b, _ in self.programs})
        bucket = next(b for b in buckets if b >= max(len(p) for p in prompts))
        tokens_BxP, start_B = left_pad(prompts, eos, bucket)
        S, M = m["stop_shape"]
        stop_SxM = np.full((S, M), -1, np.int32)
        for j, s in enumerate([s for s in stop_ids if len(s)][:S]):
            stop_SxM[j, M - len(s[-M:]):] = s[-M:]
        key_data_Bx2 = np.asarray(jax.random.key_data(keys_B)).astype(np.uint32)
        out_BxN, done_B = self._program(bucket, len(prompts)).call(
            self.weights, tokens_BxP, start_B, key_data_Bx2, np.float32(sampling.temperature),
            np.int32(sampling.top_k), np.float32(sampling.top_p), np.float32(sampling.repetition_penalty),
            np.int32(sampling.min_new_tokens), np.int32(eos), np.int32(m["n_vocab"]), stop_SxM, np.int32(n))
        rows = np.asarray(out_BxN)[:, :n].tolist()
        return [cut_at_eos(row, eos) for row in rows], np.asarray(done_B).tolist()

    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, **kwargs) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.generate_ids([self.tokenizer.encode(p) for p in prompts], max_new_tokens, **kwargs)
        texts = [self.tokenizer.decode(row) for row in ids]
        return texts[0] if isinstance(prompt, str) else texts


def load_exported(folder: str | Path) -> ExportedModel:
    return ExportedModel(folder)
