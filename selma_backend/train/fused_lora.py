"""One fused forward and backward for our LoRA on ``Linear`` layers, used while training.

PEFT's LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the base matmul,
two thin LoRA matmuls, then a multiply and an add over the whole output, each its own autograd node,
and as many again in the backward. Here the scaled LoRA product is added inside the output's matmul
(``addmm``), and the backward is written out: ``dxa = g B s``, ``dB = s g^T xa``, ``dA = dxa^T x`` and
the input gradient ``g W + dxa A`` in one more ``addmm``. The mathematics and the parameters (PEFT's
own ``lora_A`` / ``lora_B``) are the same, so export, checkpoints and resume do not change; only the
order of float roundings differs.

Only the plain case is fused: our adapter alone active, not merged, no dropout, no LoRA variant (DoRA),
no bias on ``lora_B``, and either one dtype throughout or autocast on (then all of it runs in the
autocast dtype, as PEFT's layers do under autocast, and the fp32 LoRA parameters get fp32 gradients)
or a bf16/fp16 base with fp32 LoRA parameters and no autocast (the same: all in the base's dtype).
Every other call goes to PEFT's own ``forward``.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F

ADAPTER = "selma"  # the name of our adapter in PEFT; model.py imports it from here (no import cycle)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a = weight.to(dtype), lora_a.to(dtype)
            bs = (lora_b * scale).to(dtype)
            xa = x2 @ a.t()
            out = F.linear(x2, w, None if bias is None else bias.to(dtype))
            out.addmm_(xa, bs.t())
        ctx.save_for_backward(x2, xa, w, a, bs)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, w, a, bs = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            dxa = g @ bs
            d_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[4] else None
            d_a = (dxa.t() @ x2).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[3] else None
            dx = None
            if ctx.needs_input_grad[0]:
                dx = (g @ w).addmm_(dxa, a).view(ctx.x_shape).to(ctx.x_dtype)
        return dx, None, None, d_a, d_b, None, None


def _compute_dtype(layer: Any, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused path computes in, or None when PEFT's own forward must run."""
    if (layer.disable_adapters or layer.merged or list(layer.active_adapters) != [ADAPTER]
            or ADAPTER in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity)
            or layer.lora_B[ADAPTER].bias is not None or getattr(layer, "fan_in_fan_out", False)):
        return None
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    if x.dtype == layer.base_layer.weight.dtype:
        lora = layer.lora_A[ADAPTER].weight.dtype
        # one dtype throughout; or a half-precision base run without autocast (``TrainConfig.autocast``
        # off): the fp32 factors are cast on use, as autocast would, and their gradients stay fp32
        if lora == x.dtype or (lora == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
            return x.dtype
    return None


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    dtype = None if args or kwargs else _compute_dtype(self, x)
    if dtype is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight,
                             float(self.scaling[ADAPTER]), dtype)


def is_fused(module: torch.nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _forward


def install(model: torch.nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` of ``model`` that carries our adapter through the fused path;
    returns how many."""
    n = 0
    for m in model.modules():
        lora_a = getattr(m, "lora_A", None)
        if (isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER in lora_a
                and isinstance(getattr(m, "base_layer", None), torch.nn.Linear) and not is_fused(m)):
            m.forward = MethodType(_forward, m)
            n += 1
    return n


def uninstall(model: torch.nn.Module) -> int:
    """Undo :func:`install`: the layers run PEFT's own ``forward`` again; returns how many."""
    n = 0
    for m in model.modules():
        if is_fused(m):
            del m.forward
            n += 1
    return n
