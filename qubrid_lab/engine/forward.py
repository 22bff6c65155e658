"""One forward pass of a causal LM over a :class:`~qubrid_lab.engine.kv.KVWriter`, returning last-token logits
(every position's with ``every_position``, which a prompt's own log probabilities need).

Two implementations:
  * :func:`transformers_forward` runs any transformers model through its own ``forward``.
  * :class:`FusedLlama` is a lean forward for Llama-architecture models (Llama, SmolLM, ...): q/k/v and
    gate/up projections fused into one matmul each, fused RMSNorm, and none of the generic per-layer Python
    plumbing. On a 2-core CPU a decode step takes about 30% less time (benchmarks/README.md); in fp32 its
    logits match transformers' own (tests/engine/test_kv.py). It reuses the model's rotary embedding (its
    cos/sin), so rope scaling variants keep working.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.engine.kv import KVWriter, PackedPrefillKV, as_transformers_cache
from qubrid_lab.models.device import Precision, quantize, release_freed_memory

# (input_ids, position_ids, kv, attention_mask, every_position=False, **inputs): ``inputs`` are what a vision
# model's processor made of a prompt's images (pixel values, ...), passed at its prefill only.
Forward = Callable[..., torch.Tensor]


def transformers_forward(model) -> Forward:
    layers = model.config.get_text_config().num_hidden_layers
    # transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name warns, then goes in 5.40)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(input_ids, position_ids, kv, attention_mask, every_position=False, **inputs):
        inputs[cache_argument] = as_transformers_cache(kv, layers)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
            **inputs,
        )
        return out.logits if every_position else out.logits[:, -1]

    return forward


def _fuse(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing the concatenated outputs of ``linears`` (same input)."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(layer.out_features for layer in linears),
        bias=has_bias,
        dtype=first.weight.dtype,
        device=first.weight.device,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([layer.bias for layer in linears]))
    return fused


class FusedLlama:
    """The lean Llama forward. ``fuse`` must run before any quantization, on the float model."""

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        return config.model_type == "llama" and getattr(config, "pretraining_tp", 1) == 1

    @staticmethod
    def fuse(model) -> None:
        """Replace q/k/v and gate/up projections by fused ones (transformers' forward is unusable after)."""
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention.qkv_proj = _fuse(attention.q_proj, attention.k_proj, attention.v_proj)
            attention.qkv_split = (
                attention.q_proj.out_features,
                attention.k_proj.out_features,
                attention.v_proj.out_features,
            )
            mlp.gate_up_proj = _fuse(mlp.gate_proj, mlp.up_proj)
            del attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.head_dim = (
            getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        )
        self.eps = self.config.rms_norm_eps
        self.act = {"silu": F.silu, "gelu": F.gelu}[self.config.hidden_act]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def __call__(self, input_ids, position_ids, kv: KVWriter, attention_mask, every_position: bool = False):
        rows, width = input_ids.shape
        # A padded batch decodes one token per row with an explicit mask; a lone prompt is plainly causal, and
        # the rest of a prompt after a cached prefix is causal aligned to the bottom right (SDPA's is_causal
        # aligns top left).
        if attention_mask is not None and width > 1:
            raise ValueError("FusedLlama prefills one unpadded prompt at a time; got a padded multi-token batch")
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None
        if mask is None and width > 1 and kv.length:
            mask = torch.ones((width, kv.length + width), dtype=torch.bool, device=input_ids.device).tril(kv.length)
        x = self._layers(input_ids, position_ids, kv, mask, causal=mask is None and width > 1)
        return self._head(x if every_position else x[:, -1])

    def packed(self, input_ids, position_ids, kv: PackedPrefillKV) -> torch.Tensor:
        """Prefill many prompts as one sequence ``[1, tokens]``: each attends to its own cached prefix and,
        causally, to itself only (``kv.mask``). Returns the logits of each prompt's last token, ``[prompts, vocab]``.

        No padding passes through the linear layers, and their matrix products get as many rows as all the
        waiting prompts together, which is what makes a CPU's matmul units efficient.
        """
        x = self._layers(input_ids, position_ids, kv, kv.mask, causal=False)
        return self._head(x[0, kv.last_tokens])

    def _layers(self, input_ids, position_ids, kv: KVWriter, mask, causal: bool) -> torch.Tensor:
        inner = self.model.model
        rows, width = input_ids.shape
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(x, position_ids)
        # Rotary embedding as transformers applies it, x * cos + rotate_half(x) * sin with rotate_half(x) =
        # [-x2, x1], computed as x * cos + roll(x) * [-sin1, sin2] (the same products and sums, so the same
        # bits), over the queries and keys of a layer at once: 4 operations per layer instead of 14.
        half = cos.shape[-1] // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        for index, layer in enumerate(inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm.weight)
            q_width, k_width, v_width = attention.qkv_split
            qk, v = attention.qkv_proj(h).split((q_width + k_width, v_width), dim=-1)
            qk = qk.view(rows, width, -1, self.head_dim).transpose(1, 2)
            v = v.view(rows, width, -1, self.head_dim).transpose(1, 2)
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            q, k = qk.split((q_width // self.head_dim, k_width // self.head_dim), dim=1)
            k, v = kv.write(index, k, v)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            x = x + attention.o_proj(attended.transpose(1, 2).reshape(rows, width, -1))
            gate, up = mlp.gate_up_proj(self._norm(x, layer.post_attention_layernorm.weight)).chunk(2, dim=-1)
            x = x + mlp.down_proj(self.act(gate) * up)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._norm(x, self.model.model.norm.weight))


def prepare_forward(model, fused: bool) -> Forward:
    """The forward to serve ``model`` with; call before quantizing, as fusing needs float weights."""
    if fused and FusedLlama.supports(model):
        FusedLlama.fuse(model)
        return FusedLlama(model)
    return transformers_forward(model)


def load_causal_lm(location: str, precision: Precision, device: torch.device, fused: bool = True):
    """Load a causal LM for serving in ``precision`` on ``device``: ``(model, forward)``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(location, dtype=precision.load_dtype, attn_implementation="sdpa")
    model.to(device).eval()
    forward = prepare_forward(model, fused)
    model = quantize(model, precision)
    release_freed_memory(model)
    return model, forward
