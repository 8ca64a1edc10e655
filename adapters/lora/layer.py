"""The adapter layer: a Linear with named low-rank updates on slices of its output."""

from __future__ import annotations

import math

import torch
from torch import nn

SEP = "__"  # module names cannot contain "."


class LoraLinear(nn.Module):
    """Wraps ``base`` (frozen); each named adapter adds ``scale * B @ A`` to output slices.

    For input x (..., in): y = base(x), then for every (slice, A, B) of the active adapter
    y[..., slice] += scale * (x @ A.T) @ B.T, with A (r, in) and B (len(slice), r).
    ``merge`` folds the active adapter into ``base.weight``; ``unmerge`` subtracts exactly what
    was added, so the two are inverses up to float rounding.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()  # f"{adapter}__{target}" -> Linear(in, r, bias=False)
        self.lora_B = nn.ModuleDict()  # f"{adapter}__{target}" -> Linear(r, len(slice), bias=False)
        self.slices: dict[str, tuple[int, int]] = {}
        self.scales: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None

    @staticmethod
    def _key(adapter: str, target: str) -> str:
        return f"{adapter}{SEP}{target}"

    def add(self, adapter: str, target: str, out_slice: tuple[int, int], rank: int, scale: float) -> None:
        key = self._key(adapter, target)
        a = nn.Linear(self.base.in_features, rank, bias=False)
        b = nn.Linear(rank, out_slice[1] - out_slice[0], bias=False)
        # As in the LoRA paper (and WeSAM): A Kaiming-uniform, B zero, so the update starts at 0.
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        a.to(self.base.weight.device), b.to(self.base.weight.device)
        self.lora_A[key], self.lora_B[key] = a, b
        self.slices[key] = out_slice
        self.scales[key] = scale

    def keys_of(self, adapter: str) -> list[str]:
        return [k for k in self.slices if k.rsplit(SEP, 1)[0] == adapter]

    def remove(self, adapter: str) -> None:
        if self.merged == adapter:
            raise RuntimeError(f"unmerge adapter {adapter!r} before deleting it")
        for k in self.keys_of(adapter):
            del self.lora_A[k], self.lora_B[k], self.slices[k], self.scales[k]
        if self.active == adapter:
            self.active = None

    def delta_weight(self, key: str) -> torch.Tensor:
        """scale * B @ A, shape (len(slice), in)."""
        return self.scales[key] * (self.lora_B[key].weight @ self.lora_A[key].weight)

    @torch.no_grad()
    def merge(self, adapter: str) -> None:
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged; unmerge it first")
        for k in self.keys_of(adapter):
            s0, s1 = self.slices[k]
            self.base.weight[s0:s1] += self.delta_weight(k).to(self.base.weight.dtype)
        self.merged = adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        for k in self.keys_of(self.merged):
            s0, s1 = self.slices[k]
            self.base.weight[s0:s1] -= self.delta_weight(k).to(self.base.weight.dtype)
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        adapter = self.active
        if adapter is None or adapter == self.merged:
            return y
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged; unmerge it before using {adapter!r}")
        keys = self.keys_of(adapter)
        if not keys:
            return y
        width = y.shape[-1]
        for k in keys:
            s0, s1 = self.slices[k]
            delta = self.lora_B[k](self.lora_A[k](x)) * self.scales[k]
            # Out-of-place so autograd keeps the base output intact.
            y = y + nn.functional.pad(delta, (s0, width - s1))
        return y
