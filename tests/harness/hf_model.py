"""The test model in plain transformers, fp32 on CPU, with KV as tensors ``k, v: (L, N, H, D)``.

The ground truth of the model-level tests: dense prefill, prefill behind a given prefix cache,
and greedy decoding that returns the generated tokens' KV the way KVCOMM stores a response base
(spec §2.4: the final generated token has no KV). The model is loaded once per process.

Module-level functions delegate to ``load_model()``; the ``HFModel`` methods are the same API.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from kvcomm_sglang.models import default_model_dir
from kvcomm_sglang.rope import RopeSpec

NUM_THREADS = int(os.environ.get("KVCOMM_ORACLE_THREADS", "2"))   # the shared CPU machine: 2
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PrefillResult:
    logits_last: torch.Tensor  # (vocab,) fp32, after the last new token
    k: torch.Tensor            # (L, N, H, D) fp32, the new tokens only, RoPE applied
    v: torch.Tensor            # (L, N, H, D) fp32


@dataclass(frozen=True)
class Generation:
    ids: list[int]             # G generated ids; the last one is EOS if decoding stopped there
    k: torch.Tensor            # (L, G-1, H, D): fed-back generated tokens, positions P..P+G-2
    v: torch.Tensor            # (L, G-1, H, D)
    logits_first: torch.Tensor  # (vocab,): logits at the last prompt token (chose ids[0])
    prompt_k: torch.Tensor     # (L, P, H, D): the whole prompt, last token recomputed
    prompt_v: torch.Tensor     # (L, P, H, D)


class HFModel:
    """A loaded causal LM (fp32, eval, no grad) with KV-tensor helpers."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.rope: RopeSpec = RopeSpec.from_hf_config(config)
        self.eos_id: int = _eos_id(tokenizer, config)

    # ---- text ----
    def render_chat(self, system: str, user: str) -> str:
        """ChatML text of one system + one user message, ending with the assistant header."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids without added BOS/EOS; special-token strings in the text map to their ids."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- forward ----
    @torch.no_grad()
    def prefill(self, ids: list[int], past: KV | None = None, start: int = 0) -> PrefillResult:
        """Run ``ids`` at positions start..start+len-1 behind ``past`` (the KV of positions
        0..start-1, each (L, start, H, D)); return the new tokens' KV and the last logits."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        past_len = 0 if past is None else past[0].shape[1]
        if start != past_len:
            raise ValueError(f"start={start} must equal the past length {past_len}")
        cache = self._cache(past)
        input_ids = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(start, start + len(ids), dtype=torch.long)[None]
        out = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        k, v = self._kv_of(cache, start)
        return PrefillResult(out.logits[0, -1].float(), k, v)

    @torch.no_grad()
    def generate_greedy(self, prompt_past: KV, last_prompt_id: int,
                        max_new_tokens: int) -> Generation:
        """Greedy decode after a prompt of length P whose first P-1 tokens' KV is ``prompt_past``;
        the last prompt token is recomputed at position P-1 (spec §6.2, §2.4)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_len = prompt_past[0].shape[1] + 1
        cache = self._cache(prompt_past)
        logits_first = self._step(cache, last_prompt_id, prompt_len - 1)
        ids = [int(logits_first.argmax())]
        while len(ids) < max_new_tokens and ids[-1] != self.eos_id:
            logits = self._step(cache, ids[-1], prompt_len + len(ids) - 1)
            ids.append(int(logits.argmax()))
        k, v = self._kv_of(cache, 0)
        return Generation(ids, k[:, prompt_len:], v[:, prompt_len:], logits_first,
                          k[:, :prompt_len], v[:, :prompt_len])

    def generate_dense(self, ids: list[int], max_new_tokens: int) -> Generation:
        """Dense prefill of ``ids[:-1]``, then ``generate_greedy`` from the last prompt token."""
        if len(ids) < 2:
            raise ValueError("generate_dense needs a prompt of at least 2 tokens")
        head = self.prefill(ids[:-1])
        return self.generate_greedy((head.k, head.v), ids[-1], max_new_tokens)

    # ---- internals ----
    def _step(self, cache, token_id: int, position: int) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([[token_id]], dtype=torch.long),
                         position_ids=torch.tensor([[position]], dtype=torch.long),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def _cache(self, past: KV | None):
        from transformers import DynamicCache

        if past is None:
            return DynamicCache(config=self.model.config)
        k, v = past
        expect = (self.num_layers, k.shape[1], self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expect or tuple(v.shape) != expect:
            raise ValueError(f"past k, v must be (L, N, H, D) = {expect}, "
                             f"got {tuple(k.shape)}, {tuple(v.shape)}")
        layers = [(_to_hf(k[i]), _to_hf(v[i])) for i in range(self.num_layers)]
        return DynamicCache(layers, config=self.model.config)

    def _kv_of(self, cache, start: int) -> KV:
        """Cache layers (1, H, T, D) -> (L, T - start, H, D) fp32 copies."""
        keys = torch.stack([layer.keys[0, :, start:] for layer in cache.layers])
        values = torch.stack([layer.values[0, :, start:] for layer in cache.layers])
        return (keys.transpose(1, 2).float().contiguous(),
                values.transpose(1, 2).float().contiguous())


def _to_hf(x: torch.Tensor) -> torch.Tensor:
    """(N, H, D) -> (1, H, N, D) fp32."""
    return x.to(torch.float32).transpose(0, 1).unsqueeze(0).contiguous()


def _eos_id(tokenizer, config) -> int:
    """End of turn: the config's eos (the tokenizer's may be wrong in GGUF conversions)."""
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return int(eos if eos is not None else tokenizer.eos_token_id)


@functools.lru_cache(maxsize=1)
def load_model() -> HFModel:
    """The converted SmolLM2-135M-Instruct in fp32 on CPU, loaded once per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(NUM_THREADS)
    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return HFModel(model, tokenizer)


def prefill(ids: list[int], past: KV | None = None, start: int = 0) -> PrefillResult:
    return load_model().prefill(ids, past, start)


def generate_greedy(prompt_past: KV, last_prompt_id: int, max_new_tokens: int) -> Generation:
    return load_model().generate_greedy(prompt_past, last_prompt_id, max_new_tokens)


def generate_dense(ids: list[int], max_new_tokens: int) -> Generation:
    return load_model().generate_dense(ids, max_new_tokens)


def render_chat(system: str, user: str) -> str:
    return load_model().render_chat(system, user)


def encode(text: str) -> list[int]:
    return load_model().encode(text)


def rope_spec() -> RopeSpec:
    return load_model().rope


def eos_id() -> int:
    return load_model().eos_id


def tokenizer():
    return load_model().tokenizer
