"""The fused LoRA Linear (``selma_backend.train.fused_lora``): the same outputs and gradients as PEFT's
own layer, in fp32 and under bf16 autocast; PEFT's path wherever the fused one does not apply; on in
training (every adapter Linear of the UNet and text encoder), gone after ``detach``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from train_helpers import tiny_config

from selma_backend.models.config import ModelConfig
from selma_backend.models.loader import load_pipeline
from selma_backend.train import fused_lora
from selma_backend.train.fused_lora import ADAPTER
from selma_backend.train.model import attach, detach, lora_modules, named_lora_params


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(24, 40)
        self.out = torch.nn.Linear(40, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.silu(self.proj(x)))


def _net(dropout: float = 0.0, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, target_modules=["proj", "out"]), net,
                            adapter_name=ADAPTER)
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.3)  # lora_B starts at zero: make both factors matter
            p.requires_grad_(True)
    return net


def _run(net: Net, x: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = net(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return y.detach(), grads, x.grad


def _lora_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in net.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def _fused_calls(net: torch.nn.Module, x: torch.Tensor) -> int:
    """How many layers took the fused path in one forward (counted from the autograd graph)."""
    x = x.clone().requires_grad_(True)
    y = net(x)
    seen, stack, n = set(), [y.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        n += type(node).__name__ == "_LoraLinearBackward"
        stack.extend(f for f, _ in node.next_functions)
    return n


def test_fused_layers_match_peft_in_fp32():
    net, x = _net(), torch.randn(3, 5, 24)
    y0, g0, dx0 = _run(net, x)
    assert fused_lora.install(net) == 2
    assert _fused_calls(net, x) == 2
    y1, g1, dx1 = _run(net, x)
    assert set(g1) == set(g0) and len(g0) == 4  # lora_A and lora_B of both layers, nothing else
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        assert g1[name].dtype == torch.float32
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6)


def test_fused_layers_under_bf16_autocast_are_as_close_to_fp32_as_peft():
    """Under autocast both paths compute in bf16; each must stay within bf16 rounding of the fp32 result
    (the fused one rounds once, after the LoRA term is added, so it is usually the closer)."""
    net, x = _net(seed=1), torch.randn(4, 7, 24)
    exact = _run(net, x)
    peft = _run(net, x, autocast=True)
    fused_lora.install(net)
    fused = _run(net, x, autocast=True)
    assert fused[0].dtype == peft[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in fused[1].values())

    def err(got, want):
        return float((got.float() - want).abs().max() / want.abs().max())

    for k, (want, p, f) in enumerate(zip(exact, peft, fused, strict=True)):
        pairs = [(f[n], p[n], want[n]) for n in want] if isinstance(want, dict) else [(f, p, want)]
        for got_fused, got_peft, ref in pairs:
            assert err(got_fused, ref) <= max(2 * err(got_peft, ref), 0.01), k


def test_peft_path_wherever_the_fused_one_does_not_apply():
    x = torch.randn(2, 3, 24)
    net = _net(dropout=0.5)
    fused_lora.install(net)
    assert _fused_calls(net, x) == 0  # dropout on the LoRA input: PEFT's forward

    net = _net()
    ref = Net()
    ref.load_state_dict({k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k})
    fused_lora.install(net)
    for layer in _lora_layers(net):
        layer.enable_adapters(False)
    assert _fused_calls(net, x) == 0
    torch.testing.assert_close(net(x), ref(x))  # adapters off: the base model exactly
    for layer in _lora_layers(net):
        layer.enable_adapters(True)

    expected = net(x).detach()
    for layer in _lora_layers(net):
        layer.merge()
    assert _fused_calls(net, x) == 0
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    for layer in _lora_layers(net):
        layer.unmerge()

    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["proj", "out"]), net, adapter_name="other")
    for layer in _lora_layers(net):
        layer.set_adapter([ADAPTER, "other"])
    assert _fused_calls(net, x) == 0  # two adapters active
    for layer in _lora_layers(net):
        layer.set_adapter(ADAPTER)
    assert _fused_calls(net, x) == 2

    assert fused_lora.uninstall(net) == 2
    assert _fused_calls(net, x) == 0 and not any(fused_lora.is_fused(m) for m in net.modules())


def test_fused_layers_under_torch_compile_and_gradient_checkpointing():
    """``TrainConfig.compile`` and ``gradient_checkpointing`` run the fused layers too: same results."""
    from torch.utils.checkpoint import checkpoint

    net, x = _net(seed=2), torch.randn(3, 5, 24)
    y0, g0, dx0 = _run(net, x)
    fused_lora.install(net)
    compiled = torch.compile(net)
    y1, g1, dx1 = _run(compiled, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    assert {n.removeprefix("_orig_mod.") for n in g1} == set(g0)
    for name, g in g1.items():
        torch.testing.assert_close(g, g0[name.removeprefix("_orig_mod.")], rtol=1e-5, atol=1e-6)

    x = x.clone().requires_grad_(True)
    y = checkpoint(net, x, use_reentrant=False)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    torch.testing.assert_close(x.grad, dx0, rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        if name in g0:
            torch.testing.assert_close(p.grad, g0[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sd1(tiny_models):
    lp = load_pipeline(ModelConfig(str(tiny_models["sd1"])))
    yield lp
    lp.release()


def test_training_runs_every_adapter_linear_fused_and_detach_restores_peft(sd1):
    pipe = sd1.pipe
    cfg = tiny_config(text_encoder_lora=True, rank=4, alpha=4)

    def grads(fused: bool) -> dict[str, torch.Tensor]:
        attach(pipe, cfg, fused=fused)
        try:
            for p in named_lora_params(pipe).values():  # lora_B starts at zero: make every path matter
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
            layers = [m for _, m in lora_modules(pipe)]
            assert layers and all(fused_lora.is_fused(m) == fused for m in layers)
            ids = pipe.tokenizer(["a red cube left of a ball"], padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids
            embeds = pipe.text_encoder(ids)[0]
            latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            pred = pipe.unet(latents, torch.tensor([500]), embeds).sample
            pred.pow(2).mean().backward()
            out = {k: p.grad.clone() for k, p in named_lora_params(pipe).items()}
        finally:
            detach(pipe)
        assert not any(fused_lora.is_fused(m) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())
        return out

    peft, fused = grads(False), grads(True)
    assert set(peft) == set(fused) and any(k.startswith("text_encoder.") for k in fused)
    for k in peft:
        torch.testing.assert_close(fused[k], peft[k], rtol=1e-4, atol=1e-6)
