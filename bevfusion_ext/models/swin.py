"""Swin Transformer camera backbone written the way mmdet 2.x writes it (BEVFusion's Swin-T).

The code patterns are kept on purpose because they are what compression tools trip over in the real model:
one fused ``qkv`` Linear reshaped to ``(3, heads, C // heads)`` and indexed ``qkv[0], qkv[1], qkv[2]``; a
``relative_position_bias_table`` of shape ``((2w-1)^2, heads)`` coupled to the head count; cyclic shift with an
attention mask and window padding; ``PatchMerging`` as ``nn.Unfold`` + LayerNorm(4C) + Linear(4C, 2C).
"""
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmcv.runner import BaseModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from .registry import MODELS


class DropPath(nn.Module):
    """Per-sample stochastic depth; every sample keeps the graph, so all parameters still get a gradient."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero whole residual branches of random samples while training, rescaling the kept ones."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index [w*w, w*w] into the ((2w-1)^2, heads) bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


class WindowMSA(nn.Module):
    """Window multi-head self-attention with a relative position bias (mmdet's WindowMSA)."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self.softmax = nn.Softmax(dim=-1)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window; x is [num_windows*B, w*w, C], mask [num_windows, w*w, w*w] or None."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(B // num_windows, num_windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ShiftWindowMSA(nn.Module):
    """(Shifted) window attention on a token grid: pad to whole windows, cyclic shift + mask, partition, reverse."""

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 drop_path_rate: float = 0.0, **msa_kwargs: Any) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, window_size, **msa_kwargs)
        self.drop = DropPath(drop_path_rate)

    def forward(self, query: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        """query [B, H*W, C] -> [B, H*W, C]."""
        B, _, C = query.shape
        H, W = hw_shape
        ws, shift = self.window_size, self.shift_size
        query = F.pad(query.view(B, H, W, C), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = query.shape[1], query.shape[2]
        mask = None
        if shift > 0:
            query = torch.roll(query, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.attention_mask(Hp, Wp, query.device)
        windows = self.w_msa(self.window_partition(query), mask=mask)
        x = self.window_reverse(windows, Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return self.drop(x[:, :H, :W, :].contiguous().view(B, H * W, C))

    def attention_mask(self, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        """-100 between tokens that the cyclic shift made neighbours but are not neighbours in the image."""
        ws, shift = self.window_size, self.shift_size

        def band(n: int) -> torch.Tensor:  # 0 / 1 / 2: [0, n-ws), [n-ws, n-shift), [n-shift, n); no in-place writes,
            i = torch.arange(n, device=device)  # which exported as an empty ScatterND when a band is empty (n == ws)
            return (i >= n - ws).long() + (i >= n - shift).long()

        region = (3 * band(Hp)[:, None] + band(Wp)[None, :]).float()[None, :, :, None]
        ids = self.window_partition(region).squeeze(-1)
        diff = ids.unsqueeze(1) - ids.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0)

    def window_partition(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hp, Wp, C] -> [B*num_windows, w*w, C]."""
        B, H, W, C = x.shape
        ws = self.window_size
        x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, ws * ws, C)

    def window_reverse(self, windows: torch.Tensor, Hp: int, Wp: int) -> torch.Tensor:
        """[B*num_windows, w*w, C] -> [B, Hp, Wp, C]."""
        ws = self.window_size
        C = windows.shape[-1]
        x = windows.view(-1, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, Hp, Wp, C)


class FFN(nn.Module):
    """mmcv's transformer FFN: Linear -> GELU -> Linear with dropout, plus the residual identity."""

    def __init__(self, embed_dims: int, feedforward_channels: int, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dims, feedforward_channels), nn.GELU(), nn.Dropout(drop_rate),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(drop_rate),
        )
        self.drop = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """identity + FFN(x)."""
        return identity + self.drop(self.layers(x))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + FFN, both residual."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, window_size: int, shift: bool,
                 drop_rate: float, drop_path_rate: float, with_cp: bool, **msa_kwargs: Any) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size, window_size // 2 if shift else 0,
                                   drop_path_rate, proj_drop_rate=drop_rate, **msa_kwargs)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, drop_rate, drop_path_rate)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        """[B, H*W, C] -> [B, H*W, C], optionally with activation checkpointing (with_cp) to save memory."""
        if self.with_cp and x.requires_grad:
            return checkpoint(self._forward, x, hw_shape, use_reentrant=False)
        return self._forward(x, hw_shape)

    def _forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
        """Attention then FFN, each with its own pre-norm."""
        x = x + self.attn(self.norm1(x), hw_shape)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    """2x2 token merge as mmcv does it: nn.Unfold(2, stride 2) -> LayerNorm(4C) -> Linear(4C, 2C, bias=False)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C] and the new grid shape (odd sizes are zero-padded)."""
        B, _, C = x.shape
        H, W = hw_shape
        x = F.pad(x.view(B, H, W, C).permute(0, 3, 1, 2), (0, W % 2, 0, H % 2))
        out_hw = (x.shape[2] // 2, x.shape[3] // 2)
        x = self.sampler(x).transpose(1, 2)
        return self.reduction(self.norm(x)), out_hw


class SwinBlockSequence(nn.Module):
    """One stage: blocks alternating plain / shifted windows, then an optional PatchMerging."""

    def __init__(self, embed_dims: int, depth: int, drop_path_rates: Sequence[float], downsample: bool,
                 **block_kwargs: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dims, shift=i % 2 == 1, drop_path_rate=drop_path_rates[i], **block_kwargs)
            for i in range(depth)
        )
        self.downsample = PatchMerging(embed_dims, 2 * embed_dims) if downsample else None

    def forward(self, x: torch.Tensor, hw_shape: tuple[int, int]) -> tuple:
        """Return (next-stage tokens, their grid, this stage's output tokens, their grid), as mmdet does."""
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is None:
            return x, hw_shape, x, hw_shape
        x_down, down_hw = self.downsample(x, hw_shape)
        return x_down, down_hw, x, hw_shape


class PatchEmbed(nn.Module):
    """Patchify with a strided conv (projection) and a LayerNorm over the token channels."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> tokens [B, H'*W', C] (image padded bottom/right to whole patches) and (H', W')."""
        p = self.patch_size
        x = self.projection(F.pad(x, (0, (p - x.shape[3] % p) % p, 0, (p - x.shape[2] % p) % p)))
        hw_shape = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw_shape


@MODELS.register_module()
class SwinTransformer(BaseModule):
    """mmdet 2.x SwinTransformer (BEVFusion's camera backbone); returns normed NCHW maps for ``out_indices``."""

    def __init__(self, embed_dims: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, patch_norm: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3), with_cp: bool = False, in_channels: int = 3,
                 patch_size: int = 4, init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dims * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, patch_norm)
        self.drop_after_pos = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            channels = self.num_features[i]
            start = sum(depths[:i])
            self.stages.append(SwinBlockSequence(
                channels, depth, rates[start:start + depth], downsample=i < len(depths) - 1, num_heads=heads,
                feedforward_channels=int(mlp_ratio * channels), window_size=window_size, drop_rate=drop_rate,
                with_cp=with_cp, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop_rate=attn_drop_rate,
            ))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        """Swin's from-scratch init: truncated-normal Linear weights, zero biases."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> one [B, C_i, H/4/2^i, W/4/2^i] map per out index."""
        x, hw_shape = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw_shape, out, out_hw = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs
