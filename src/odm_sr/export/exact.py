"""Exact float parts of a transformer's integer model: the FP ops between its integer layers in float64.

A SwinIR block feeds its quantizers through float32 ops that ONNX Runtime and PyTorch round differently (a
few ulps): LayerNorm before ``attn.qkv`` and ``mlp.fc1``, q·k, the relative-position bias, the mask, softmax
and attention·v before ``attn.proj``, GELU before ``mlp.fc2``, and ``conv_first`` + ``patch_embed.norm``,
which start the residual stream that reaches every quantizer. At 2 bits one code flipped by such an ulp is a
whole step, amplified downstream (bench/README.md, "Integer ONNX export": up to 28 grey levels on B100).

Here each of these ops runs in float64 and is rounded to float32 once, where the model's float32 value would
be quantized. The modules are plain torch ops in float64, so the PyTorch forward (``odm-sr-eval
eval.exact=true``) and the traced ONNX graph run the same ops in the same order; ONNX Runtime's CPU kernels
support all of them in double except ``Erf``, so GELU's erf is a table of Taylor polynomials (``erf64``). Both
sides then give float32(exact value) bit for bit, up to a float64 round-off of a different summation order.
The residual adds stay float32: an IEEE add of identical float32 operands is the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from odm_sr.quant.placement import replace_module

# erf by Taylor polynomials around the centres c = 0, ¼, ½, …, 6 (beyond 6, erf is ±1 in float64): erf(c + t) =
# erf(c) + Σ_{n≥1} erf⁽ⁿ⁾(c)/n!·tⁿ, |t| ≤ ⅛, with erf⁽ⁿ⁾(c) = 2/√π·(−1)ⁿ⁻¹·Hₙ₋₁(c)·exp(−c²) (Hermite Hₙ). Degree 14
# gives |error| ≤ 2e-16 (tests/export/test_exact.py); 12 would do. The coefficient table is float64 (erf(c) from
# torch.erf), the polynomial is Horner's: 15 Gathers and 2·14 Mul/Add per element.
ERF_STEP, ERF_CLAMP, ERF_DEGREE = 0.25, 6.0, 14


def erf_taylor_table() -> Tensor:
    """(degree + 1, centres) float64: the Taylor coefficients of erf at c = k·ERF_STEP, k = 0 … 24."""
    c = torch.arange(0, round(ERF_CLAMP / ERF_STEP) + 1, dtype=torch.float64) * ERF_STEP
    hermite = [torch.ones_like(c), 2 * c]  # H_{n+1} = 2c·H_n − 2n·H_{n−1}
    for n in range(1, ERF_DEGREE):
        hermite.append(2 * c * hermite[n] - 2 * n * hermite[n - 1])
    slope = 2 / math.sqrt(math.pi) * torch.exp(-c * c)
    cols, factorial = [torch.erf(c)], 1.0
    for n in range(1, ERF_DEGREE + 1):
        factorial *= n
        cols.append((-1) ** (n - 1) * hermite[n - 1] * slope / factorial)
    return torch.stack(cols)


_ERF_TABLE = erf_taylor_table()


def erf64(z: Tensor) -> Tensor:
    """erf of a float64 tensor with Abs/Round/Gather/Mul/Add/Sign only (ORT CPU has no double ``Erf``);
    clipped to [−1, 1] (a round-off above 1 would flip the sign of GELU's far negative tail)."""
    a = torch.clamp(torch.abs(z), max=ERF_CLAMP)
    centre = torch.round(a / ERF_STEP)
    t = a - centre * ERF_STEP  # exact (Sterbenz)
    index, table = centre.long(), _ERF_TABLE.to(z.device)
    p = table[ERF_DEGREE][index]  # one Gather per coefficient: a Split of a gathered (…, 15) costs 3x more
    for n in range(ERF_DEGREE - 1, -1, -1):
        p = table[n][index] + t * p
    return torch.clamp(torch.sign(z) * p, -1.0, 1.0)


class ExactGELU(nn.Module):
    """float32(x·½·(1 + erf(x/√2))) in float64: ``nn.GELU()`` (approximate='none'), the MLP activation."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.double()
        return (x * 0.5 * (1.0 + erf64(x * math.sqrt(0.5)))).float()


class ExactLayerNorm(nn.Module):
    """float32(LayerNorm(x)) in float64: (x − mean)/sqrt(var + eps)·w + b over the last dim (biased var)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
            raise ValueError("ExactLayerNorm: one normalized dim with weight and bias")
        self.eps = float(norm.eps)
        self.register_buffer("weight64", norm.weight.detach().double().clone(), persistent=False)
        bias = torch.zeros_like(self.weight64) if norm.bias is None else norm.bias.detach().double().clone()
        self.register_buffer("bias64", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.double()
        centred = x - x.mean(dim=-1, keepdim=True)
        var = (centred * centred).mean(dim=-1, keepdim=True)
        return (centred / torch.sqrt(var + self.eps) * self.weight64 + self.bias64).float()


class ExactWindowAttention(nn.Module):
    """``windows.WindowAttention`` (own index) with its FP part in float64: softmax((q·scale) kᵀ + B + mask) v
    on the float32 outputs of ``qkv``, rounded to float32 once before ``proj``; ``qkv``/``proj`` are the
    integer layers."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.num_heads, self.scale = attn.qkv, attn.proj, attn.num_heads, float(attn.scale)
        n = attn.window_size ** 2
        index = attn.relative_position_index.view(-1)
        bias = attn.relative_position_bias_table.detach()[index].view(n, n, -1).permute(2, 0, 1)
        self.register_buffer("bias64", bias.double().unsqueeze(0).contiguous(), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, rpi: Tensor | None = None) -> Tensor:
        b_, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).double()
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias64
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(b_ // num_windows, num_windows, heads, n, n) + mask.double()[None, :, None]
            attn = attn.view(-1, heads, n, n)
        out = (torch.softmax(attn, dim=-1) @ v).float()
        return self.proj(out.transpose(1, 2).reshape(b_, n, c))


def make_swinir_exact(model: nn.Module) -> None:
    """In place: the FP ops that feed a SwinIR's quantizers exact (LayerNorms before qkv/fc1 and the patch
    embedding's, window attention, GELU). The final ``norm`` and the convs after the body feed no quantizer
    and stay float32."""
    from odm_sr.models.windows import WindowAttention

    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.LayerNorm) and (leaf in ("norm1", "norm2") or name == "patch_embed.norm"):
            replace_module(model, name, ExactLayerNorm(module))
        elif isinstance(module, WindowAttention):
            replace_module(model, name, ExactWindowAttention(module))
        elif isinstance(module, nn.GELU) and name.endswith("mlp.act"):
            replace_module(model, name, ExactGELU())


def _pointwise64(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1×1 conv in float64 as a channel ``MatMul`` (ORT's CPU ``Conv`` has no double kernel)."""
    return (x.permute(0, 2, 3, 1) @ weight.t() + bias).permute(0, 3, 1, 2)


def _weights64(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach()
    return conv.weight.detach().double().flatten(1).clone(), bias.double().clone()


class ExactCCA(nn.Module):
    """IMDN's contrast-aware channel attention in float64, rounded to float32 once: x·sigmoid(W₂·relu(W₁·(std(x)
    + mean(x)) + b₁) + b₂) (population std over H, W; the 1×1 convs as matmuls); its output is ``c5``'s input."""

    def __init__(self, cca: nn.Module) -> None:
        super().__init__()
        (self.w1, self.b1), (self.w2, self.b2) = _weights64(cca.conv_du[0]), _weights64(cca.conv_du[2])

    def forward(self, x: Tensor) -> Tensor:
        x64 = x.double()
        mean = x64.mean(dim=(2, 3), keepdim=True)
        centred = x64 - mean
        std = torch.sqrt((centred * centred).mean(dim=(2, 3), keepdim=True))
        hidden = torch.relu(_pointwise64(std + mean, self.w1, self.b1))
        return (x64 * torch.sigmoid(_pointwise64(hidden, self.w2, self.b2))).float()


class ExactPAConv(nn.Module):
    """PAN's ``PAConv`` with its gate in float64: k4(float32(k3(x)·sigmoid(k2(x)))), k2 (FP 1×1) and the sigmoid
    and product in float64 on the float32 ``k3`` output (an integer layer); the product is ``k4``'s input."""

    def __init__(self, paconv: nn.Module) -> None:
        super().__init__()
        self.k3, self.k4 = paconv.k3, paconv.k4
        self.w2, self.b2 = _weights64(paconv.k2)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(_pointwise64(x.double(), self.w2, self.b2))
        return self.k4((self.k3(x).double() * gate).float())


def make_imdn_exact(model: nn.Module) -> None:
    """In place: every IMDB's channel attention in float64 (it feeds ``c5``'s quantizer). LeakyReLU, split and
    concat are exact in float32 already (one IEEE multiply, copies)."""
    from odm_sr.models.imdn import CCALayer

    for name, module in list(model.named_modules()):
        if isinstance(module, CCALayer):
            replace_module(model, name, ExactCCA(module))


def make_pan_exact(model: nn.Module) -> None:
    """In place: every SCPA's pixel-attention gate in float64 (it feeds ``k4``'s quantizer). The upsampling's
    ``PA`` and the interpolations come after the last quantizer and stay float32."""
    from odm_sr.models.pan import PAConv

    for name, module in list(model.named_modules()):
        if isinstance(module, PAConv):
            replace_module(model, name, ExactPAConv(module))


# backbone family -> its exact float64 versions of the FP ops before its quantizers (in place), beside the
# exact FP convs of its row (``Backbone.exact_fp_convs``); the export registers them here, the backbone table
# knows nothing of the export
EXACT_FP_OPS: dict[str, Callable[[nn.Module], None]] = {"swinir": make_swinir_exact, "imdn": make_imdn_exact,
                                                      "pan": make_pan_exact}
