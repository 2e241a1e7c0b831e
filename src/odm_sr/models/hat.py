"""HAT, the Hybrid Attention Transformer (Chen et al., CVPR 2023), `pixelshuffle` SR variant.

Source: `XPixelGroup/HAT` `hat/archs/hat_arch.py` (module names, buffers, defaults, init).
Padding to a window multiple follows `hat/models/hat_model.py` `pre_process` (reflect), done here in
`forward` so any input size works.

State dict: the top-level buffers `relative_position_index_SA` and `relative_position_index_OCA` are
persistent (as official); there is no `attn_mask` buffer: the official code computes the shifted-window
mask for every input in `forward_features`. The image mean is a non-persistent buffer.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import DropPath
from torch import nn

from odm_sr.models.base import SRModel
from odm_sr.models.edsr import RGB_MEAN, pixelshuffle_upsampler
from odm_sr.models.windows import (
    PAD_MODES,
    MaskCache,
    Mlp,
    PatchEmbed,
    WindowAttention,
    image_to_tokens,
    init_transformer_weights,
    pad_to_multiple,
    relative_position_index,
    tokens_to_image,
    trunc_normal_,
    window_partition,
    window_reverse,
)


class GlobalAvgPool(nn.Module):
    """The mean over H and W, keeping them as 1 x 1: ``nn.AdaptiveAvgPool2d(1)``'s values, but its backward is a
    plain broadcast, which CUDA runs deterministically (adaptive pooling's backward has no deterministic CUDA
    kernel, so ``trainer.deterministic=true`` would stop HAT). No parameters: checkpoint keys are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


class ChannelAttention(nn.Module):
    """RCAN channel attention: x * sigmoid(conv(relu(conv(avgpool(x)))))."""

    def __init__(self, num_feat: int, squeeze_factor: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            GlobalAvgPool(),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1, padding=0),
            nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel attention block: conv3x3 (C -> C/compress) - GELU - conv3x3 (-> C) - channel attention."""

    def __init__(self, num_feat: int, compress_ratio: int, squeeze_factor: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class HAB(nn.Module):
    """Hybrid attention block: x + (S)W-MSA(norm1 x) + conv_scale * CAB(norm1 x), then x + MLP(norm2 x)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, compress_ratio: int, squeeze_factor: int, conv_scale: float,
                 mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        if min(input_resolution) <= window_size:  # official: no partition when the image fits a window
            shift_size, window_size = 0, min(input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, own_index=False)
        self.conv_block = CAB(dim, compress_ratio, squeeze_factor)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], rpi_sa: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        height, width = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        conv_x = self.conv_block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, height * width, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size ** 2, c)
        mask = attn_mask if self.shift_size > 0 else None
        windows = self.attn(windows, mask=mask, rpi=rpi_sa)
        x = window_reverse(windows.view(-1, self.window_size, self.window_size, c), self.window_size,
                           height, width)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, height * width, c)) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OCAB(nn.Module):
    """Overlapping cross-attention block: window queries attend to keys/values of an enlarged window.

    The key window is window_size + int(overlap_ratio * window_size), unfolded with stride window_size.
    """

    def __init__(self, dim: int, window_size: int, overlap_ratio: float, num_heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.overlap_win_size = int(window_size * overlap_ratio) + window_size
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.unfold = nn.Unfold(kernel_size=self.overlap_win_size, stride=window_size,
                                padding=(self.overlap_win_size - window_size) // 2)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window_size + self.overlap_win_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
        height, width = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        qkv = self.qkv(x).reshape(b, height, width, 3, c).permute(3, 0, 4, 1, 2)  # 3, b, c, h, w
        q_windows = window_partition(qkv[0].permute(0, 2, 3, 1), self.window_size)
        q_windows = q_windows.view(-1, self.window_size ** 2, c)
        kv_windows = self.unfold(torch.cat((qkv[1], qkv[2]), dim=1))  # b, 2c * ow * ow, nw
        kv_windows = rearrange(kv_windows, "b (nc ch owh oww) nw -> nc (b nw) (owh oww) ch", nc=2, ch=c,
                               owh=self.overlap_win_size, oww=self.overlap_win_size)
        head_dim = c // self.num_heads
        b_, nq, _ = q_windows.shape
        nk = kv_windows.shape[2]
        q = q_windows.reshape(b_, nq, self.num_heads, head_dim).transpose(1, 2)
        k = kv_windows[0].reshape(b_, nk, self.num_heads, head_dim).transpose(1, 2)
        v = kv_windows[1].reshape(b_, nk, self.num_heads, head_dim).transpose(1, 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[rpi.view(-1)].view(nq, nk, -1)
        attn = self.softmax(attn + bias.permute(2, 0, 1).unsqueeze(0))
        windows = (attn @ v).transpose(1, 2).reshape(b_, nq, self.dim)
        windows = windows.view(-1, self.window_size, self.window_size, self.dim)
        x = window_reverse(windows, self.window_size, height, width).view(b, height * width, self.dim)
        x = self.proj(x) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    """`depth` HABs (odd ones shifted) followed by one OCAB."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, compress_ratio: int, squeeze_factor: int, conv_scale: float,
                 overlap_ratio: float, mlp_ratio: float, drop_path: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            HAB(dim, input_resolution, num_heads, window_size,
                shift_size=0 if j % 2 == 0 else window_size // 2, compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor, conv_scale=conv_scale, mlp_ratio=mlp_ratio,
                drop_path=drop_path[j])
            for j in range(depth)])
        self.overlap_attn = OCAB(dim, window_size, overlap_ratio, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x_size, params["rpi_sa"], params["attn_mask"])
        return self.overlap_attn(x, x_size, params["rpi_oca"])


class RHAG(nn.Module):
    """Residual hybrid attention group: x + conv3x3(AttenBlocks(x))."""

    def __init__(self, dim: int, **group_kwargs) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(dim, **group_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int], params: dict) -> torch.Tensor:
        features = tokens_to_image(self.residual_group(x, x_size, params), x_size)
        return image_to_tokens(self.conv(features)) + x


class HAT(SRModel):
    """HAT for SR; input and output in [0, 1] (`pixel_range` 1.0). Defaults are HAT-S.

    drop_path_rate: the official default 0.1 (stochastic depth, active in train mode only).
    """

    official_eval_pad_mode = "reflect"  # eval.pad_mode=official (hat_model.py pre_process)

    def __init__(self, scale: int, img_size: int = 64, embed_dim: int = 144,
                 depths: tuple[int, ...] = (6,) * 6, num_heads: tuple[int, ...] = (6,) * 6,
                 window_size: int = 16, compress_ratio: int = 24, squeeze_factor: int = 24,
                 conv_scale: float = 0.01, overlap_ratio: float = 0.5, mlp_ratio: float = 2.0,
                 drop_path_rate: float = 0.1, img_range: float = 1.0, pad_mode: str = "reflect",
                 name: str = "hat") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode {pad_mode!r} is not supported; allowed: {PAD_MODES}")
        self.name, self.scale, self.pixel_range = name, scale, 1.0
        self.img_range, self.window_size, self.pad_mode = img_range, window_size, pad_mode
        self.shift_size = window_size // 2
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        overlap_window = window_size + int(overlap_ratio * window_size)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size))
        self.register_buffer("relative_position_index_OCA",
                             relative_position_index(window_size, overlap_window))
        self._mask_cache = MaskCache()

        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(RHAG(
                embed_dim, input_resolution=(img_size, img_size), depth=depth, num_heads=num_heads[i],
                window_size=window_size, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor,
                conv_scale=conv_scale, overlap_ratio=overlap_ratio, mlp_ratio=mlp_ratio,
                drop_path=rates[start:start + depth]))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        num_feat = 64
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                  nn.LeakyReLU(inplace=True))
        self.upsample = pixelshuffle_upsampler(scale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        self.apply(init_transformer_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        params = {
            "attn_mask": self._mask_cache.get(x_size, self.window_size, self.shift_size, x.device),
            "rpi_sa": self.relative_position_index_SA,
            "rpi_oca": self.relative_position_index_OCA,
        }
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, x_size, params)
        return tokens_to_image(self.norm(tokens), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad to a window multiple, x - mean, conv_first, + conv_after_body(RHAGs), upsample, + mean,
        crop to scale x input size."""
        height, width = x.shape[2:]
        x = pad_to_multiple(x, self.window_size, self.pad_mode)
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        x = x / self.img_range + self.mean
        return x[:, :, :height * self.scale, :width * self.scale]
