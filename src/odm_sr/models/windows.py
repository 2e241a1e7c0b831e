"""Building blocks shared by SwinIR and HAT: window padding and attention, token reshapes (their upsampler and
image mean are EDSR's, in ``edsr.py``).

Facts (tensor layouts, index formulas, the -100 mask value, parameter names) follow
`JingyunLiang/SwinIR` `models/network_swinir.py` and `XPixelGroup/HAT` `hat/archs/hat_arch.py`;
HAT copies these pieces from SwinIR, so one implementation serves both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

PAD_MODES = ("reflect", "mirror")


def tokens_to_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W); the official `PatchUnEmbed`."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); the official `PatchEmbed` without norm."""
    return x.flatten(2).transpose(1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> torch.Tensor:
    """Pad the bottom and right of an NCHW tensor so that H and W are multiples of `multiple`.

    `reflect`: `F.pad(..., 'reflect')` up to the next multiple (none if already one), as SwinIR's
    `check_image_size` and HAT's `pre_process`.
    `mirror`: SwinIR `main_test_swinir.py`: `cat([x, flip(x)])` (edge pixel repeated) by
    (H // multiple + 1) * multiple - H, i.e. 1 to `multiple` pixels, a full window even on a multiple.
    Padding wider than the image is applied in several rounds (the official code fails there).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode {mode!r} is not supported; allowed: {PAD_MODES}")
    height, width = x.shape[-2:]
    if mode == "mirror":
        pad_h, pad_w = multiple - height % multiple, multiple - width % multiple
    else:
        pad_h, pad_w = (multiple - height % multiple) % multiple, (multiple - width % multiple) % multiple
    x = _pad_dim(x, pad_h, dim=-2, mode=mode)
    return _pad_dim(x, pad_w, dim=-1, mode=mode)


def _pad_dim(x: torch.Tensor, amount: int, dim: int, mode: str) -> torch.Tensor:
    """Pad `amount` pixels at the end of `dim`, in rounds no wider than the image allows."""
    while amount > 0:
        size = x.shape[dim]
        step = min(amount, size - 1 if mode == "reflect" else size)
        if step == 0:  # a 1-pixel side cannot be reflected: repeat it
            x = torch.cat([x, x.narrow(dim, size - 1, 1).expand_as(x.narrow(dim, 0, 1))], dim)
            step = 1
        elif mode == "reflect":
            pad = (0, step, 0, 0) if dim == -1 else (0, 0, 0, step)
            x = F.pad(x, pad, mode="reflect")
        else:
            x = torch.cat([x, x.flip(dim).narrow(dim, 0, step)], dim)
        amount -= step
    return x


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window_size, window_size, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """(B * num_windows, window_size, window_size, C) -> (B, H, W, C); inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Attention mask for shifted windows: (num_windows, N, N) with 0 inside a region and -100 across.

    Regions are the 3x3 grid cut at -window_size and -shift_size, as in SwinIR's `calculate_mask`.
    Returns a fresh CPU tensor (computed once per argument tuple).
    """
    return _shifted_window_mask(height, width, window_size, shift_size).clone()


@functools.lru_cache(maxsize=16)
def _shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    img_mask = torch.zeros((1, height, width, 1), device="cpu")  # never cache a meta/cuda tensor
    cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for rows in cuts:
        for cols in cuts:
            img_mask[:, rows, cols, :] = region
            region += 1
    mask_windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def relative_position_index(query_window: int, key_window: int | None = None) -> torch.Tensor:
    """Index into a relative-position-bias table, shape (q*q, k*k), int64.

    Square windows (key_window None): SwinIR's index, table size (2q-1)^2, values 0 .. (2q-1)^2 - 1.
    Overlapping keys (key_window > q, HAT's OCA): `calculate_rpi_oca`, table size (q+k-1)^2. Official
    quirk, kept because the index is stored in the checkpoints: its shift (q - k + 1) is too small, so
    values run negative (-880 .. 640 for q=16, k=24) and rely on negative (wrap-around) indexing; each
    table entry is still used by exactly one offset.
    """
    key_window = query_window if key_window is None else key_window
    query_coords = _flat_coords(query_window)  # 2, q*q
    key_coords = _flat_coords(key_window)  # 2, k*k
    if key_window == query_window:
        relative = query_coords[:, :, None] - key_coords[:, None, :]
        offset = query_window - 1
    else:
        relative = key_coords[:, None, :] - query_coords[:, :, None]
        offset = query_window - key_window + 1
    relative = relative.permute(1, 2, 0).contiguous() + offset
    relative[:, :, 0] *= query_window + key_window - 1
    return relative.sum(-1)


def _flat_coords(size: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"))
    return torch.flatten(coords, 1)


class MaskCache:
    """One-entry cache of `shifted_window_mask` for the last input size and device.

    The official code recomputes the mask on every forward whose size differs from `img_size`.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._mask: torch.Tensor | None = None

    def get(self, size: tuple[int, int], window: int, shift: int, device: torch.device) -> torch.Tensor:
        key = (size, window, shift, device)
        if self._key != key:
            self._mask = shifted_window_mask(size[0], size[1], window, shift).to(device)
            self._key = key
        return self._mask


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """timm's `trunc_normal_(tensor, std=std)` as SwinIR/HAT call it: N(0, std^2) truncated to [-2, 2].

    The bounds are absolute, 100 std away for std 0.02, so a clamped normal has the same distribution;
    timm's inverse-CDF sampler takes seconds on CPU for SwinIR-classical.
    """
    with torch.no_grad():
        return tensor.normal_(0.0, std).clamp_(-2.0, 2.0)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (dropout after each, 0 by default), as in SwinIR/HAT."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative-position bias.

    attn = softmax(q k^T / sqrt(d) + B[index] + mask) v, then `proj`.
    SwinIR keeps the index as its own persistent buffer `relative_position_index` (`own_index=True`);
    HAT keeps one shared buffer in the top-level model and passes it in (`own_index=False`).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 own_index: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        if own_index:
            self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rpi: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * num_windows, N, C); mask: (num_windows, N, N) or None; rpi: index if not own."""
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        index = self.relative_position_index if rpi is None else rpi
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            mask = mask.to(attn.dtype)[None, :, None]  # cached masks are float32
            attn = attn.view(b_ // num_windows, num_windows, self.num_heads, n, n) + mask
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


def init_transformer_weights(module: nn.Module) -> None:
    """SwinIR/HAT `_init_weights`: Linear ~ trunc_normal(std 0.02), bias 0; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


class PatchEmbed(nn.Module):
    """Tokens plus LayerNorm (`patch_norm=True`); kept as a module for the key `patch_embed.norm`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(image_to_tokens(x))

