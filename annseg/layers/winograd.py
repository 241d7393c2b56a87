"""Training on the CPU: wide 3x3 convolutions as Winograd F(2x2, 3x3), 2.25x fewer products.

A 3x3 conv with stride 1 and ``padding == dilation`` (the "same" convs of a dilated ResNet's
bottlenecks and of ANN's heads) is computed on 2x2 output tiles. Each tile reads a 4x4 input
patch d, which is transformed to ``V = B^T d B``; the weight g to ``U = G g G^T``; the 16
transformed positions are 16 independent matrix products over channels, ``M = V U``; and the
tile is ``Y = A^T M A``. That is 16 products for 4 outputs where a direct conv takes 36, and
it is the same function up to float re-association (the transforms only add, subtract and halve).
A dilated conv is tiled on its own lattice: a tile's outputs and its patch are ``dilation``
apart. The backward is the exact gradient of the same algorithm: the input gradient is the
transposed transforms around ``dM U^T``, the weight gradient ``G^T (sum over tiles V^T dM) G``.

The work runs over blocks of input channels and slabs of tile rows, in buffers reused from
one slab to the next, so that what is alive at once stays about the size of the input; the
backward recomputes ``V`` from the input autograd keeps anyway, instead of keeping it (four
times the input). Narrow convs stay with oneDNN: their products are too thin to pay for
the transforms, and so do small maps and maps whose dilated tiles would overhang the edge
by much. ``benchmarks/conv-winograd/`` has the timings against oneDNN, with the command.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from annseg.layers.conv_grad import conv_arguments

MIN_CHANNELS = 256  # below this (input or output), the transforms cost what the products save
MIN_POSITIONS = 1024  # B x H x W: smaller maps are left to oneDNN (too little work per product)
MAX_TILE_WASTE = 1.2  # tile-aligned area over the map's area: the tiles past the map are computed and dropped
SLAB_VALUES = 576 * 512  # tiles x channels per slab: thinner products (fewer tiles) run slower
MAX_BLOCK_CHANNELS = 512  # input channels per block: bounds the transformed weight and maps alive at once

# F(2x2, 3x3) (Lavin & Gray): input transform B^T, weight transform G, output transform A^T; the
# last row of B^T and last column of A^T are negated (the two signs cancel in M), which turns
# the transposed transforms' negations into plain reads.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, -1, 0, 1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, 1))


def _transposed(matrix: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(zip(*matrix))


_B, _GT, _A = _transposed(_BT), _transposed(_G), _transposed(_AT)


class WinogradConv(TorchFunctionMode):
    """Context for a training forward on the CPU: channels-last 3x3 "same" convs run as Winograd
    F(2x2, 3x3) (``_Winograd``) where ``applies`` says it pays (wide enough, on a large enough map)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.conv2d:
            conv = conv_arguments(*args, **kwargs)
            if conv is not None and applies(*conv):
                return _Winograd.apply(*conv[:3], conv[5])
        return func(*args, **kwargs)


def applies(input: object, weight: object, bias: object, stride: list[int], padding: list[int],
            dilation: list[int], groups: int) -> bool:
    """Whether ``winograd_conv2d`` computes this ``F.conv2d`` call (and pays for it)."""
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.device.type == "cpu"
            and input.dim() == 4 and groups == 1 and tuple(weight.shape[-2:]) == (3, 3)
            and stride == [1, 1] and padding == dilation and input.dtype in (torch.float32, torch.float64)
            and input.dtype == weight.dtype and (bias is None or isinstance(bias, Tensor))
            and not torch.is_autocast_enabled("cpu")
            and weight.shape[0] >= MIN_CHANNELS and weight.shape[1] >= MIN_CHANNELS
            and input.is_contiguous(memory_format=torch.channels_last) and _worth_tiling(input, dilation))


def _worth_tiling(input: Tensor, dilation: list[int]) -> bool:
    """Enough positions, and few tiles past the map's edge (a dilated conv's tiles span 2 x dilation)."""
    batch, _, height, width = input.shape
    aligned = [math.ceil(n / (2 * d)) * 2 * d for n, d in zip((height, width), dilation)]
    return batch * height * width >= MIN_POSITIONS and aligned[0] * aligned[1] <= MAX_TILE_WASTE * height * width


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int | Sequence[int] = 1) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for a 3x3 weight, as
    Winograd F(2x2, 3x3); differentiable. The output is channels-last."""
    pair = [int(dilation), int(dilation)] if isinstance(dilation, int) else [int(d) for d in dilation]
    return _Winograd.apply(x, weight, bias, pair)


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: list[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        tiling, scratch = _Tiling(x, dilation), _Scratch(x)
        image = x.permute(0, 2, 3, 1)  # (B, H, W, C_in) view
        out = x.new_empty(tiling.batch, tiling.rows_out, tiling.cols_out, weight.shape[0])  # NHWC, tile-aligned
        for first, (c0, c1) in enumerate(_blocks(weight.shape[1])):
            u = _weight_transform(weight[:, c0:c1])  # (16, C_out, c)
            for a0, a1 in tiling.slabs(c1 - c0):
                v = tiling.input_transform(tiling.slab(image[..., c0:c1], a0, a1, scratch), scratch)  # (16, T, c)
                m = scratch("m", (16, v.shape[1], u.shape[1]))
                for k in range(16):
                    torch.mm(v[k], u[k].t(), out=m[k])
                tiling.output_transform(m, out, a0, a1, scratch, accumulate=first > 0)
        if bias is not None:
            out.add_(bias)
        return tiling.crop(out)

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: a double backward raises
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        tiling, scratch = _Tiling(x, ctx.dilation), _Scratch(x)
        image, grad = x.permute(0, 2, 3, 1), tiling.aligned(grad_out.permute(0, 2, 3, 1))
        grad_input = grad_weight = grad_bias = None
        # U, V and dM are recomputed per block and slab rather than kept: each is a multiple of
        # the weight or the maps, and the transforms cost little next to the products.
        if ctx.needs_input_grad[1]:  # dg = G^T (sum over tiles V^T dM) G, a block of input channels at a time
            grad_weight = torch.empty_like(weight)
            for c0, c1 in _blocks(weight.shape[1]):
                grad_u = weight.new_empty(16, weight.shape[0], c1 - c0)
                for first, (a0, a1) in enumerate(tiling.slabs(c1 - c0)):
                    v = tiling.input_transform(tiling.slab(image[..., c0:c1], a0, a1, scratch), scratch)
                    dm = tiling.output_transform_grad(grad, a0, a1, scratch)  # (16, T, C_out)
                    for k in range(16):
                        grad_u[k].addmm_(dm[k].t(), v[k], beta=0 if first == 0 else 1)
                _weight_transform_grad(grad_u, grad_weight[:, c0:c1])
                del grad_u
        if ctx.needs_input_grad[0]:  # dx = B (dM U^T) B^T, summed where patches overlap
            grad_input = x.new_zeros(tiling.batch, tiling.height, tiling.width, x.shape[1])  # NHWC
            for c0, c1 in _blocks(weight.shape[1]):
                u = _weight_transform(weight[:, c0:c1])
                for a0, a1 in tiling.slabs(c1 - c0):
                    dm = tiling.output_transform_grad(grad, a0, a1, scratch)
                    dv = scratch("v", (16, dm.shape[1], c1 - c0))
                    for k in range(16):
                        torch.mm(dm[k], u[k], out=dv[k])
                    slab = tiling.input_transform_grad(dv, a0, a1, scratch)
                    tiling.add_slab(slab, grad_input[..., c0:c1], a0, a1)
            grad_input = grad_input.permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
        if ctx.needs_input_grad[2]:  # False for a None bias
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None


def _blocks(channels: int) -> list[tuple[int, int]]:
    """Input-channel ranges of at most MAX_BLOCK_CHANNELS: the transforms are per channel, and a
    block's transformed weight and maps are all that is alive at once."""
    return [(c, min(c + MAX_BLOCK_CHANNELS, channels)) for c in range(0, channels, MAX_BLOCK_CHANNELS)]


class _Tiling:
    """The tile grid of one conv call: rows and columns of 2x2 output tiles, ``dilation`` apart.

    Output row ``y = a*2d + t*d + r`` (tile row a, row t of the tile, lattice offset r < d) and
    the tile's input rows ``a*2d + r + u*d - d``, u < 4 (rows outside the input read zeros);
    columns alike. Tiles are numbered (batch, a, r, b, r'), the order of the transformed maps'
    T axis. Work runs over slabs of whole tile rows.
    """

    def __init__(self, x: Tensor, dilation: list[int]) -> None:
        self.batch, _, self.height, self.width = x.shape
        self.dh, self.dw = dilation
        self.tile_rows = math.ceil(self.height / (2 * self.dh))
        self.tile_cols = math.ceil(self.width / (2 * self.dw))
        self.rows_out, self.cols_out = 2 * self.dh * self.tile_rows, 2 * self.dw * self.tile_cols

    def slabs(self, channels: int) -> list[tuple[int, int]]:
        """Tile-row ranges [a0, a1) of at least SLAB_VALUES / channels tiles (the last may have fewer)."""
        per_row = self.batch * self.dh * self.tile_cols * self.dw
        step = max(1, math.ceil(SLAB_VALUES / channels / per_row))
        return [(a, min(a + step, self.tile_rows)) for a in range(0, self.tile_rows, step)]

    def _slab_rows(self, a0: int, a1: int) -> tuple[int, int, int, int]:
        """The slab's first input row (may be negative), its row count, and the input rows
        [lo, hi) inside the map."""
        top, rows = 2 * self.dh * a0 - self.dh, 2 * self.dh * (a1 - a0 + 1)
        return top, rows, max(0, top), min(self.height, top + rows)

    def slab(self, image: Tensor, a0: int, a1: int, scratch: _Scratch) -> Tensor:
        """The input rows that tile rows [a0, a1) read, zero-padded: (B, rows, cols, C) in scratch."""
        top, rows, lo, hi = self._slab_rows(a0, a1)
        dw, width = self.dw, self.width
        out = scratch("slab", (self.batch, rows, self.cols_out + 2 * dw, image.shape[3]))
        out[:, :lo - top].zero_()
        out[:, hi - top:].zero_()
        inside = out[:, lo - top:hi - top]
        inside[:, :, :dw].zero_()
        inside[:, :, dw + width:].zero_()
        inside[:, :, dw:dw + width] = image[:, lo:hi]
        return out

    def add_slab(self, slab: Tensor, grad: Tensor, a0: int, a1: int) -> None:
        """Adds a slab's gradient (as ``slab`` lays it out) into the NHWC input gradient, dropping the padding."""
        top, _, lo, hi = self._slab_rows(a0, a1)
        grad[:, lo:hi].add_(slab[:, lo - top:hi - top, self.dw:self.dw + self.width])

    def aligned(self, y: Tensor) -> Tensor:
        """An NHWC output-sized map as a contiguous tile-aligned one (zeros past the map)."""
        if (self.rows_out, self.cols_out) == (self.height, self.width) and y.is_contiguous():
            return y
        out = y.new_zeros(self.batch, self.rows_out, self.cols_out, y.shape[3])
        out[:, :self.height, :self.width] = y
        return out

    def crop(self, out: Tensor) -> Tensor:
        """A tile-aligned NHWC output as the (B, C, H, W) channels-last map."""
        out = out.permute(0, 3, 1, 2)
        if (self.rows_out, self.cols_out) == (self.height, self.width):
            return out
        return out[:, :, :self.height, :self.width].contiguous(memory_format=torch.channels_last)

    def _tiles(self, tensor: Tensor, size: int, tile_rows: int, first_row: int = 0) -> Tensor:
        """(size u, size u', B, tile_rows, dh, b, dw, C) view of an NHWC map from row ``first_row``:
        each tile's size x size positions, ``dilation`` apart (4x4 input patches, 2x2 outputs)."""
        n, rows, cols, c = tensor.stride()
        dh, dw = self.dh, self.dw
        return tensor.as_strided((size, size, self.batch, tile_rows, dh, self.tile_cols, dw, tensor.shape[3]),
                                 (dh * rows, dw * cols, n, 2 * dh * rows, rows, 2 * dw * cols, cols, c),
                                 tensor.storage_offset() + first_row * rows)

    def _patches(self, slab: Tensor) -> Tensor:
        """Each tile's 4x4 input patch in a slab (laid out by ``slab``)."""
        return self._tiles(slab, 4, slab.shape[1] // (2 * self.dh) - 1)

    def _outputs(self, out: Tensor, a0: int, a1: int) -> Tensor:
        """Each tile's 2x2 outputs in tile rows [a0, a1) of a tile-aligned NHWC map."""
        return self._tiles(out, 2, a1 - a0, 2 * self.dh * a0)

    def input_transform(self, slab: Tensor, scratch: _Scratch) -> Tensor:
        """V = B^T d B for a slab's tiles: (16, T, C), in scratch "v"."""
        patches = self._patches(slab)  # (4 u, 4 u', ...)
        v = scratch("v", (4, 4) + patches.shape[2:])  # (4 i, 4 j, ...)
        column = scratch("half", (4,) + patches.shape[2:])  # (4 u, ...), one j at a time
        for j, coefficients in enumerate(_BT):
            _combine(patches.unbind(1), [coefficients], [column])
            _combine(column.unbind(0), _BT, v[:, j].unbind(0))
        return v.view(16, -1, slab.shape[3])

    def output_transform(self, m: Tensor, out: Tensor, a0: int, a1: int, scratch: _Scratch,
                         accumulate: bool = False) -> None:
        """Y = A^T M A, written (or with ``accumulate`` added) into the tile-aligned NHWC ``out`` for tile rows [a0, a1)."""
        outputs = self._outputs(out, a0, a1)
        m = m.view((4, 4) + outputs.shape[2:])
        half = scratch("m half", (2,) + m.shape[1:])  # (2 t, 4 j, ...)
        _combine(m.unbind(0), _AT, half.unbind(0))
        _combine(half.unbind(1), _AT, outputs.unbind(1), accumulate=accumulate)

    def output_transform_grad(self, grad: Tensor, a0: int, a1: int, scratch: _Scratch) -> Tensor:
        """dM = A dY A^T from the tile-aligned NHWC output gradient: (16, T, C_out), in scratch "m"."""
        outputs = self._outputs(grad, a0, a1)  # (2 t, 2 t', ...)
        half = scratch("m half", (4,) + outputs.shape[1:])  # (4 i, 2 t', ...)
        dm = scratch("m", (4, 4) + outputs.shape[2:])
        for row, target in zip(_combine(outputs.unbind(0), _A, half.unbind(0), alias=True), dm):
            _combine(row.unbind(0), _A, target.unbind(0))
        return dm.view(16, -1, grad.shape[3])

    def input_transform_grad(self, dv: Tensor, a0: int, a1: int, scratch: _Scratch) -> Tensor:
        """B dV B^T summed over overlapping patches: the gradient of ``slab(.., a0, a1)``, in scratch "slab"."""
        top, rows, _, _ = self._slab_rows(a0, a1)
        slab = scratch("slab", (self.batch, rows, self.cols_out + 2 * self.dw, dv.shape[2]))
        slab.zero_()
        patches = self._patches(slab)  # (4 u, 4 u', ...)
        dv = dv.view((4, 4) + patches.shape[2:])  # (4 i, 4 j, ...)
        row = scratch("half", dv.shape[1:])  # (4 j, ...), one u at a time
        full = scratch("full", dv.shape[1:])  # (4 u', ...)
        for u, coefficients in enumerate(_B):
            (source,) = _combine(dv.unbind(0), [coefficients], [row], alias=True)
            _combine(source.unbind(0), _B, full.unbind(0))
            patches[u, :2].add_(full[:2])  # patches overlap by two rows and columns: each
            patches[u, 2:].add_(full[2:])  # half of a row of them covers distinct positions
        return slab


class _Scratch:
    """Named buffers reused from slab to slab: a fresh large allocation is page-faulted in
    again every time (glibc maps it anew), which can cost more than the additions that fill it."""

    def __init__(self, like: Tensor) -> None:
        self.like, self.buffers = like, {}

    def __call__(self, name: str, shape: tuple[int, ...]) -> Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = self.like.new_empty(size)
        return buffer[:size].view(shape)


def _combine(rows: Sequence[Tensor], matrix: Sequence[Sequence[float]], out: Sequence[Tensor],
             alias: bool = False, accumulate: bool = False) -> list[Tensor]:
    """out[k] = sum_i matrix[k][i] * rows[i] for a small constant matrix, one elementwise op per
    term (``accumulate``: out[k] += ...); returns the results. With ``alias``, a result that is a
    single row is that row, uncopied."""
    results = []
    for target, coefficients in zip(out, matrix):
        terms = [(c, row) for c, row in zip(coefficients, rows) if c != 0]
        (c0, r0), rest = terms[0], terms[1:]
        if alias and not rest and c0 == 1:
            results.append(r0)
            continue
        results.append(target)
        if accumulate:
            rest = terms
        elif rest and c0 == 1:
            (c1, r1), rest = rest[0], rest[1:]
            torch.add(r0, r1, alpha=c1, out=target)
        elif rest and c0 == -1 and rest[0][0] == 1:
            (_, r1), rest = rest[0], rest[1:]
            torch.sub(r1, r0, out=target)
        elif c0 == 1:
            target.copy_(r0)
        else:
            torch.mul(r0, c0, out=target)
        for c, row in rest:
            target.add_(row, alpha=c)
    return results


def _weight_transform(weight: Tensor) -> Tensor:
    """U = G g G^T for every (output, input) channel pair: (16, C_out, C_in), contiguous."""
    taps = weight.permute(2, 3, 0, 1)  # (3 k, 3 l, C_out, C_in)
    u = weight.new_empty((4, 4) + taps.shape[2:])
    row = weight.new_empty(taps.shape[1:])  # (3 l, ...), one a at a time
    for a, coefficients in enumerate(_G):
        (source,) = _combine(taps.unbind(0), [coefficients], [row], alias=True)
        _combine(source.unbind(0), _G, u[a].unbind(0))
    return u.view(16, *taps.shape[2:])


def _weight_transform_grad(grad_u: Tensor, out: Tensor) -> None:
    """Writes dg = G^T dU G into ``out`` (C_out, C_in, 3, 3); dU (16, C_out, C_in) is overwritten."""
    du = grad_u.view(4, 4, *grad_u.shape[1:])  # (4 a, 4 b, ...)
    both = du[1] + du[2]  # G^T over a, in place: k=0 dU0 + (dU1 + dU2)/2, k=1 (dU1 - dU2)/2, k=2 (dU1 + dU2)/2 + dU3
    du[0].add_(both, alpha=0.5)
    du[1].sub_(du[2]).mul_(0.5)
    torch.add(du[3], both, alpha=0.5, out=du[2])
    del both
    _combine(du[:3].unbind(1), _GT, out.permute(3, 2, 0, 1).unbind(0))  # rows b, into (3 l) x (3 k, C_out, C_in)
