"""LoRA adapters served on a loaded base model, a different adapter (or none) for each row of a batch.

A fine-tuned model is its base plus a low-rank update ``scale * B @ A`` on some linear layers. Rather than a
merged copy of the base per fine-tuned model, every adapter's ``A``/``B`` stay small and separate, and a
forward hook on each adapted layer adds ``x @ A.T @ B.T`` for the rows that use that adapter. The base
weights are untouched (they may be int8 on CPU), many adapters share one base, and rows of different
fine-tuned models and of the base itself decode in one batch.

Adapters come from peft's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``),
trained on the unfused model: on a :class:`~qubrid_lab.engine.forward.FusedLlama` their q/k/v (and
gate/up) updates are stacked into one update of the fused layer, with a block-diagonal ``B``.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qubrid_lab.errors import InvalidRequestError

# fused layer -> the unfused layers it stacks, in output order
FUSED_MEMBERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LowRank:
    """One layer's update: ``x @ a.T @ b.T`` (the scale is folded into ``b``)."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]


class LoraSet:
    """The adapters loaded on one model, and which rows of the current forward pass use which."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(iter(model.parameters())).device
        self._layers = {name: module for name, module in model.named_modules() if _is_linear(module)}
        self._adapters: dict[str, dict[str, LowRank]] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._groups: list[tuple[str, torch.Tensor | None]] = []

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def load(self, name: str, adapter_dir: Path) -> None:
        """Read a peft LoRA adapter and make it available under ``name``."""
        updates = self._read(Path(adapter_dir))
        for layer in updates:
            if layer not in self._hooks:
                self._hooks[layer] = self._layers[layer].register_forward_hook(self._hook_for(layer))
        self._adapters[name] = updates

    def remove(self, name: str) -> None:
        self._adapters.pop(name, None)
        used = {layer for updates in self._adapters.values() for layer in updates}
        for layer in set(self._hooks) - used:
            self._hooks.pop(layer).remove()

    @contextmanager
    def rows(self, adapters: list[str | None]):
        """Within the block, row ``i`` of every forward pass uses adapter ``adapters[i]`` (None: the base)."""
        names = set(adapters) - {None}
        if len(names) == 1 and None not in adapters:
            self._groups = [(names.pop(), None)]
        else:
            self._groups = [
                (name, torch.tensor([i for i, a in enumerate(adapters) if a == name], device=self.device))
                for name in sorted(names)
            ]
        try:
            yield
        finally:
            self._groups = []

    def _hook_for(self, layer: str):
        def add_updates(module, inputs, output):
            if not self._groups:
                return None
            x = inputs[0]
            for name, index in self._groups:
                update = self._adapters[name].get(layer)
                if update is None:
                    continue
                if index is None:
                    output = output + (x @ update.a.T) @ update.b.T
                else:
                    output = output.index_add(0, index, (x[index] @ update.a.T) @ update.b.T)
            return output

        return add_updates

    # reading peft's files
    def _read(self, adapter_dir: Path) -> dict[str, LowRank]:
        try:
            config = json.loads((adapter_dir / "adapter_config.json").read_text())
            from safetensors.torch import load_file

            tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{adapter_dir} does not hold a readable LoRA adapter: {exc}") from exc
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            raise InvalidRequestError(
                f"{adapter_dir}: only plain LoRA adapters can be served (not DoRA or other peft types)."
            )
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise InvalidRequestError(
                    f"{adapter_dir}: the adapter changes '{key}', which serving does not support."
                )
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
        updates = {}
        for module, pair in pairs.items():
            rank = pair["A"].shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            updates[module] = LowRank(pair["A"], pair["B"] * scale)
        return self._place(updates, adapter_dir)

    def _place(self, updates: dict[str, LowRank], adapter_dir: Path) -> dict[str, LowRank]:
        """Map the adapter's (unfused) layer names onto this model's layers, stacking fused members."""
        placed: dict[str, LowRank] = {}
        for module, update in updates.items():
            if module in self._layers:
                placed[module] = self._cast(module, update)
                continue
            parent, _, leaf = module.rpartition(".")
            fused = next((f for f, members in FUSED_MEMBERS.items() if leaf in members), None)
            if fused is None or f"{parent}.{fused}" not in self._layers:
                raise InvalidRequestError(
                    f"{adapter_dir}: the adapter's layer '{module}' is not in this base model; "
                    "was it trained on another model?"
                )
            placed.setdefault(f"{parent}.{fused}", None)
        for layer, update in list(placed.items()):
            if update is None:
                parent, _, fused = layer.rpartition(".")
                placed[layer] = self._cast(layer, self._stack(parent, fused, updates))
        return placed

    def _stack(self, parent: str, fused: str, updates: dict[str, LowRank]) -> LowRank:
        """One update for a fused layer from its members' updates; a member without one gets zero rows."""
        layer = self._layers[f"{parent}.{fused}"]
        members = FUSED_MEMBERS[fused]
        widths = _member_widths(self.model, parent, fused, layer.out_features)
        present = [(m, updates.get(f"{parent}.{m}")) for m in members]
        a = torch.cat([u.a for _, u in present if u is not None])
        b = torch.zeros((layer.out_features, a.shape[0]), dtype=a.dtype)
        row, col = 0, 0
        for (member, update), width in zip(present, widths):
            if update is not None:
                rank = update.a.shape[0]
                b[row : row + width, col : col + rank] = update.b
                col += rank
            row += width
        return LowRank(a, b)

    def _cast(self, layer: str, update: LowRank) -> LowRank:
        module = self._layers[layer]
        if update.a.shape[1] != module.in_features or update.b.shape[0] != module.out_features:
            raise InvalidRequestError(
                f"The adapter's update of '{layer}' has shape {tuple(update.b.shape)} x "
                f"{tuple(update.a.shape)}, which does not fit the base model's layer."
            )
        dtype = _activation_dtype(self.model)
        return LowRank(update.a.to(self.device, dtype).contiguous(), update.b.to(self.device, dtype).contiguous())


def _is_linear(module: nn.Module) -> bool:
    """A plain, dynamic-int8, w8a16, w4a16/w4a32 or oneDNN-packed linear layer."""
    return (
        isinstance(module, nn.Linear)
        or type(module).__name__ in ("Linear", "Int8WeightLinear", "Int4WeightLinear", "PackedLinear")
        and hasattr(module, "in_features")
    )


def _member_widths(model: nn.Module, parent: str, fused: str, out_features: int) -> tuple[int, ...]:
    owner = model.get_submodule(parent)
    if fused == "qkv_proj":
        return owner.qkv_split
    return (out_features // 2, out_features // 2)


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations have in the model: that of its embeddings (int8 layers still take floats)."""
    return model.get_input_embeddings().weight.dtype
