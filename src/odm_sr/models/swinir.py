"""SwinIR (Liang et al., ICCVW 2021) for classical and lightweight image SR.

Source: `JingyunLiang/SwinIR` `models/network_swinir.py` (module names, buffers, defaults, init).
Only the SR upsamplers `pixelshuffle` (classical) and `pixelshuffledirect` (lightweight) and the
`1conv` residual connection are implemented; the token (un)embedding modules have no parameters and
are plain reshapes here, so the state-dict keys are unchanged.

State dict: every block holds `attn.relative_position_index`; shifted blocks (odd j) also hold
`attn_mask` sized for `img_size`, as in the official checkpoints. The image mean is a non-persistent
buffer (the official code keeps a plain tensor attribute), so it is not in the state dict.
"""

from __future__ import annotations

import torch
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
    shifted_window_mask,
    tokens_to_image,
    window_partition,
    window_reverse,
)


class SwinTransformerBlock(nn.Module):
    """x + W-MSA(norm1(x)), then x + MLP(norm2(x)); odd blocks shift windows by window_size // 2."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:  # official: no partition when the image fits a window
            shift_size, window_size = 0, min(input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, own_index=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*input_resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)
        self._mask_cache = MaskCache()

    def _mask_for(self, size: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        if self.shift_size == 0:
            return None
        if size == tuple(self.input_resolution):
            return self.attn_mask
        return self._mask_cache.get(size, self.window_size, self.shift_size, device)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        height, width = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size ** 2, c)
        windows = self.attn(windows, mask=self._mask_for(x_size, x.device))
        x = window_reverse(windows.view(-1, self.window_size, self.window_size, c), self.window_size,
                           height, width)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(b, height * width, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """A stack of `depth` Swin blocks, alternating regular and shifted windows."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float, drop_path: list[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 shift_size=0 if j % 2 == 0 else window_size // 2,
                                 mlp_ratio=mlp_ratio, drop_path=drop_path[j])
            for j in range(depth)])

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: x + conv3x3(blocks(x)) (resi_connection `1conv`)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float, drop_path: list[float]) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size,
                                         mlp_ratio, drop_path)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        features = tokens_to_image(self.residual_group(x, x_size), x_size)
        return image_to_tokens(self.conv(features)) + x


class SwinIR(SRModel):
    """SwinIR for SR; input and output in [0, 1] (`pixel_range` 1.0).

    forward: pad to a window multiple (`pad_mode`), x - mean, conv_first, x + conv_after_body(RSTBs),
    reconstruct, + mean, crop to scale x input size.
    pad_mode: `reflect` as `network_swinir.py`'s `check_image_size`; `mirror` as `main_test_swinir.py`,
    the script behind the published numbers (see `pad_to_multiple`).
    drop_path_rate: the official default 0.1 (stochastic depth, active in train mode only).
    """

    official_eval_pad_mode = "mirror"  # eval.pad_mode=official (main_test_swinir.py)

    def __init__(self, scale: int, img_size: int = 64, embed_dim: int = 60,
                 depths: tuple[int, ...] = (6, 6, 6, 6), num_heads: tuple[int, ...] = (6, 6, 6, 6),
                 window_size: int = 8, mlp_ratio: float = 2.0, upsampler: str = "pixelshuffledirect",
                 drop_path_rate: float = 0.1, img_range: float = 1.0, pad_mode: str = "reflect",
                 name: str = "swinir") -> None:
        super().__init__()
        if upsampler not in ("pixelshuffle", "pixelshuffledirect"):
            raise ValueError(f"upsampler {upsampler!r} is not supported; "
                             "allowed: 'pixelshuffle', 'pixelshuffledirect'")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode {pad_mode!r} is not supported; allowed: {PAD_MODES}")
        self.name, self.scale, self.pixel_range = name, scale, 1.0
        self.img_range, self.window_size, self.pad_mode = img_range, window_size, pad_mode
        self.upsampler = upsampler
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        resolution = (img_size, img_size)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(RSTB(embed_dim, resolution, depth, num_heads[i], window_size, mlp_ratio,
                                    rates[start:start + depth]))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self._build_reconstruction(scale, embed_dim)
        self.apply(init_transformer_weights)

    def _build_reconstruction(self, scale: int, embed_dim: int, num_feat: int = 64) -> None:
        if self.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = pixelshuffle_upsampler(scale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        else:  # pixelshuffledirect, the official `UpsampleOneStep`
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, scale ** 2 * 3, 3, 1, 1),
                                          nn.PixelShuffle(scale))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, x_size)
        return tokens_to_image(self.norm(tokens), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        x = pad_to_multiple(x, self.window_size, self.pad_mode)
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        if self.upsampler == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        x = x / self.img_range + self.mean
        return x[:, :, :height * self.scale, :width * self.scale]
