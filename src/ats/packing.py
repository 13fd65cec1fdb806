"""Packing a mini-batch whose images keep different numbers of tokens.

Tokens live as a flat list of valid rows [T, C], image by image; the padded view [B, m, C]
(m = the longest image, valid tokens first) is made only where attention needs it. Linear layers
and norms therefore run on valid rows alone, and an image's result does not depend on its
batch-mates. While padding is a small share of the positions (PADDED_LAYOUT_SLACK), the rows stay
in the padded layout instead: running the linear layers on a few padded positions costs less than
gathering and scattering rows in every block.

Static mode (``static=True``) fixes each block's width in advance (its capacity, from the config and the
input size): the rows always hold the padded layout, the kept tokens first and padding after them, and
nothing in the forward reads a device value on the host, so it compiles to one graph.

Exporting: torch.export (and torch.onnx.export(dynamo=True), which runs it) carries both modes, static mode at its
fixed widths and the adaptive mode with each selection's width a data-dependent size, the largest kept count computed
in the graph (``exporting`` switches off the host reads that size it otherwise). TorchScript carries neither: every
patched forward starts in ``TokenBatch.from_dense``, which refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .profiling import region

#: Keep the padded layout while padding is at most this share of the B * m positions (measured on
#: DeiT-S and the reference model, docs/performance.md).
PADDED_LAYOUT_SLACK = 0.1

#: Why TorchScript is refused (``refuse_tracing``), and what to use.
TORCHSCRIPT_REFUSAL = ("TorchScript (torch.jit.trace, torch.jit.script, and torch.onnx.export with dynamo=False, which "
                       "traces with it) cannot record a patched model: its forward sizes every block from the config "
                       "and the tokens kept in Python, which TorchScript freezes or cannot compile. Use "
                       "torch.onnx.export(model, (images,), dynamo=True) or torch.export.export (ats export --onnx "
                       "FILE does it); ats.patch(model, config, static=True) gives a graph of fixed shapes")


def exporting() -> bool:
    """Whether torch.export (also under torch.onnx.export(dynamo=True)) or the TorchScript-based ONNX exporter is
    recording the forward now."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def refuse_tracing(unexportable: str = "") -> None:
    """Raise RuntimeError naming the fix when TorchScript records a patched forward, and when an exporter records
    one that ``unexportable`` says (why) it cannot carry."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(TORCHSCRIPT_REFUSAL)
    if unexportable and exporting():
        raise RuntimeError(f"this patched model does not export: {unexportable}")


@dataclass
class TokenBatch:
    """B images' tokens, packed.

    rows: [T, C] valid tokens of image 0, then image 1, ...
    lengths: [B] long, tokens per image (positions holding a token, prefix included).
    width: m, the padded length (max of lengths), a Python int.
    row_index: [T] long, each row's position in the flattened padded layout [B * m];
        None when the rows are the whole padded layout (T == B * m, padding rows included).
    source: [B, m] long, the index each token had in the model's original token sequence
        (prefix tokens first, then patches); -1 on padding.
    cls_live: [B] bool, False where the class token was dropped (it then stays at position 0,
        frozen: it is no key for others and no longer updated). None when enforced.
    sizes: [T] float, how many patches each token holds after fusing or merging (None: all 1);
        attention then adds log(size) to each key's logit.
    full: True when every image fills all m positions (no padding anywhere).
    keep_padding: the padded-and-masked alternative: rows always hold all B * m positions, so
        every layer also runs on padding (for comparison; slower).
    num_source_tokens: N0, the length of the original token sequence that ``source`` indexes.
    static: the width of every selection is given (a capacity) instead of read off the kept counts: rows
        hold the padded layout and no host sync happens (``select``'s ``capacity``).
    in_source_order: True while every image holds the whole original sequence in its order (no token
        dropped or moved), so that a block whose attention depends on positions may run its own forward.
    valid: [B, m] bool, ``position_mask`` once computed (a cache that ``with_rows`` passes on), else None.
    """

    rows: torch.Tensor
    lengths: torch.Tensor
    width: int
    row_index: Optional[torch.Tensor]
    source: torch.Tensor
    cls_live: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    full: bool = True
    keep_padding: bool = False
    num_source_tokens: int = 0
    in_source_order: bool = True
    static: bool = False
    valid: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dense(cls, x: torch.Tensor, keep_padding: bool = False, static: bool = False) -> "TokenBatch":
        """Pack a batch with no padding. x: [B, N, C]. Refuses TorchScript (``refuse_tracing``): every patched forward
        starts here."""
        refuse_tracing()
        batch, n, _ = x.shape
        lengths = torch.full((batch,), n, dtype=torch.long, device=x.device)
        source = torch.arange(n, device=x.device).expand(batch, n)
        return cls(x.reshape(batch * n, x.shape[-1]), lengths, n, None, source, keep_padding=keep_padding or static,
                   num_source_tokens=n, static=static)

    def with_lengths(self, lengths: torch.Tensor) -> "TokenBatch":
        """A batch of whole sequences [B, N] in their order as image i's first ``lengths[i]`` tokens, padding after
        them (inputs that come padded: each image takes part with its own count)."""
        lengths = lengths.to(self.lengths.device)
        keep = torch.arange(self.width, device=lengths.device) < lengths[:, None]
        return self.select(keep, capacity=self.width)[0]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_dense(self) -> bool:
        """True when no image has padding, a frozen class token or sizes: plain timm blocks apply."""
        return self.full and self.cls_live is None and self.sizes is None

    @property
    def position_mask(self) -> torch.Tensor:
        """[B, m] bool, True where a position holds a token (frozen class token included)."""
        if self.valid is None:
            self.valid = torch.arange(self.width, device=self.lengths.device) < self.lengths[:, None]
        return self.valid

    @property
    def key_mask(self) -> Optional[torch.Tensor]:
        """[B, m] bool, the keys attention may use; None when every position is one."""
        if self.full and self.cls_live is None:
            return None if self.sizes is None else self.position_mask
        mask = self.position_mask
        if self.cls_live is not None:
            mask = mask.clone()
            mask[:, 0] &= self.cls_live
        return mask

    @property
    def attention_mask(self) -> Optional[torch.Tensor]:
        """What attention adds to its key logits: [B, 1, 1, m], bool (keys allowed) or float
        (log size, -inf on masked keys); None when every key counts once."""
        mask = self.key_mask
        if self.sizes is not None:
            log_size = self.pad_values(self.sizes.log())
            return log_size.masked_fill(~mask, float("-inf"))[:, None, None, :]
        return None if mask is None else mask[:, None, None, :]

    def patch_positions(self, prefix: int) -> torch.Tensor:
        """[B, m] bool, the positions holding a patch token (a token at or after the ``prefix`` ones)."""
        patches = torch.arange(self.width, device=self.lengths.device) >= prefix
        return patches.expand(self.batch_size, -1) if self.full else patches & self.position_mask

    @property
    def common_live_tokens(self) -> Optional[int]:
        """The live token count of every image when all have the same (no padding, no frozen class
        token), else None: per-image counts then come from ``live_tokens``."""
        return self.width if self.full and self.cls_live is None else None

    @property
    def live_tokens(self) -> torch.Tensor:
        """[B] long, tokens per image that take part in attention (a frozen class token does not)."""
        if self.cls_live is None:
            return self.lengths
        return self.lengths - (~self.cls_live).long()

    @property
    def image_of_row(self) -> torch.Tensor:
        """[T] long, the image each row belongs to."""
        if self.row_index is None:
            return torch.arange(self.batch_size, device=self.rows.device).repeat_interleave(self.width)
        return torch.div(self.row_index, self.width, rounding_mode="floor")

    @property
    def row_live(self) -> Optional[torch.Tensor]:
        """[T, 1] float, 0 on the rows of frozen class tokens (their updates are dropped), else None."""
        if self.cls_live is None:
            return None
        live = torch.ones(self.rows.shape[0], 1, dtype=self.rows.dtype, device=self.rows.device)
        live[self.first_rows, 0] = self.cls_live.to(self.rows.dtype)
        return live

    def dense(self) -> torch.Tensor:
        """[B, m, C] view of the rows; only for a batch whose rows are the whole padded layout."""
        return self.rows.view(self.batch_size, self.width, self.rows.shape[-1])

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """Scatter per-row values [T, D] into the padded layout [B, m, D] (zeros on padding)."""
        if self.row_index is None:
            return rows.view(self.batch_size, self.width, rows.shape[-1])
        with region("ats.pack"):
            padded = rows.new_zeros(self.batch_size * self.width, rows.shape[-1])
            padded.index_copy_(0, self.row_index, rows)
            return padded.view(self.batch_size, self.width, rows.shape[-1])

    def pad_values(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter one value per row [T] into the padded layout [B, m] (zeros on padding).

        Apart from ``pad`` so that torch.compile keeps fewer variants of each function."""
        if self.row_index is None:
            return values.view(self.batch_size, self.width)
        return values.new_zeros(self.batch_size * self.width).index_copy_(0, self.row_index, values).view(
            self.batch_size, self.width)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Gather the valid rows [T, D] of a padded tensor [B, m, D]."""
        flat = padded.reshape(self.batch_size * self.width, padded.shape[-1])
        if self.row_index is None:
            return flat
        with region("ats.pack"):
            return flat.index_select(0, self.row_index)

    def with_rows(self, rows: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> "TokenBatch":
        """The same layout with new rows [T, C] (and new sizes [T], if given)."""
        return replace(self, rows=rows, sizes=self.sizes if sizes is None else sizes)

    def padded_sizes(self) -> torch.Tensor:
        """[B, m] float sizes in the padded layout (1 for every token when none were merged)."""
        sizes = self.sizes if self.sizes is not None else self.rows.new_ones(self.rows.shape[0])
        return self.pad_values(sizes)

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """A map between positions as a map between rows: positions [B, m] long gives a position of the same
        image for each position -> [T] long, for each row the row at the position its own maps to."""
        flat = self._flat(positions)
        if self.row_index is None:
            return flat
        return self._row_at_position().index_select(0, flat.index_select(0, self.row_index))

    @property
    def first_rows(self) -> torch.Tensor:
        """[B] long, the row of each image's first token (the class token, where there is one)."""
        if self.row_index is None:
            return torch.arange(self.batch_size, device=self.lengths.device) * self.width
        return torch.cumsum(self.lengths, 0) - self.lengths

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] long, the row of each image's last token."""
        if self.row_index is None:
            return torch.arange(self.batch_size, device=self.lengths.device) * self.width + self.lengths - 1
        return torch.cumsum(self.lengths, 0) - 1

    def select(self, keep: torch.Tensor, last: Optional[torch.Tensor] = None,
               capacity: Optional[int] = None) -> tuple["TokenBatch", torch.Tensor]:
        """Keep the positions marked in keep [B, m], packed to the lowest indices in their order; the
        kept positions also marked in ``last`` [B, m] (if given) go after the others.

        Returns the new batch (rows gathered) and ``rows_from`` [T'], the old row of each new row (to
        gather any other per-row tensor). A static batch takes its new width from ``capacity`` (the most
        tokens the block can keep; an image marking more keeps its first ``capacity`` in that order);
        otherwise the width is the largest kept count, read on the host.
        """
        if self.static:
            if capacity is None:
                raise ValueError("a static TokenBatch needs the capacity of each selection (select(..., capacity=))")
            with region("ats.pack"):
                return self._select_padded(keep, last, min(capacity, self.width))
        if exporting():
            return self._select_padded(keep, last, self._exported_width(keep))
        with region("ats.pack"):
            return self._select(keep, last)

    def _exported_width(self, keep: torch.Tensor) -> int:
        """The largest kept count of keep [B, m] as torch.export's data-dependent size, within the batch's width."""
        width = keep.sum(dim=1).max().item()
        torch._check(width > 1)  # a prefix token and a kept one: attention's mask [B, 1, 1, width] broadcasts
        torch._check(width <= self.width)
        return width

    def _select_padded(self, keep: torch.Tensor, last: Optional[torch.Tensor],
                       width: int) -> tuple["TokenBatch", torch.Tensor]:
        """``select`` into the padded layout at ``width`` (at most the batch's): the capacity in static mode, the
        largest kept count (a data-dependent size) in an exported adaptive forward."""
        lengths = keep.sum(dim=1).clamp(max=width)
        positions = _kept_first(keep, last).narrow(1, 0, width)
        rows_from = self._flat(positions)
        valid = torch.arange(width, device=keep.device) < lengths.unsqueeze(1)
        sizes = None if self.sizes is None else self.sizes.index_select(0, rows_from)
        source = self.source.gather(1, positions).masked_fill(~valid, -1)
        packed = TokenBatch(self.rows.index_select(0, rows_from), lengths, width, None, source, self.cls_live, sizes,
                            full=False, keep_padding=True, num_source_tokens=self.num_source_tokens,
                            in_source_order=False, static=self.static, valid=valid)
        return packed, rows_from

    @torch.compiler.disable
    def _select(self, keep: torch.Tensor, last: Optional[torch.Tensor]) -> tuple["TokenBatch", torch.Tensor]:
        """The adaptive selection. Its one host sync sizes the new batch; torch.compile leaves it to eager mode,
        as it would otherwise compile it anew for every batch size it sees."""
        batch = self.batch_size
        lengths = keep.sum(dim=1)
        counts = lengths.tolist()
        total, width = sum(counts), max(counts)
        positions = _kept_first(keep, last).narrow(1, 0, width)
        full = total == batch * width
        padded_layout = self.keep_padding or total >= (1 - PADDED_LAYOUT_SLACK) * batch * width
        row_index = None if padded_layout else _row_index(lengths, width, total)
        valid_flat = self._flat(positions)
        if row_index is not None:
            valid_flat = valid_flat.index_select(0, row_index)
        rows_from = valid_flat if self.row_index is None else self._row_at_position().index_select(0, valid_flat)
        source = self.source.gather(1, positions)
        valid = None
        if not full:
            valid = torch.arange(width, device=keep.device) < lengths.unsqueeze(1)
            source = source.masked_fill(~valid, -1)
        sizes = None if self.sizes is None else self.sizes.index_select(0, rows_from)
        in_order = self.in_source_order and last is None and full and width == self.width
        packed = TokenBatch(self.rows.index_select(0, rows_from), lengths, width, row_index, source,
                            self.cls_live, sizes, full, self.keep_padding, self.num_source_tokens, in_order,
                            valid=valid)
        return packed, rows_from

    def _flat(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [B, k] of each image -> [B * k] long, their indices in the flattened padded layout [B * m]."""
        if self.batch_size > 1:
            positions = positions + torch.arange(0, self.batch_size * self.width, self.width,
                                                 device=positions.device).unsqueeze(1)
        return positions.reshape(-1)

    def _row_at_position(self) -> torch.Tensor:
        """[B * m] long, the row index of each padded position (0 on padding); for packed rows only."""
        at = torch.zeros(self.batch_size * self.width, dtype=torch.long, device=self.rows.device)
        return at.index_copy_(0, self.row_index, torch.arange(self.rows.shape[0], device=self.rows.device))


def _kept_first(keep: torch.Tensor, last: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, m] long, every position in the order ``select`` packs them: the kept ones first in their order (those
    also in ``last`` after the others), then the rest."""
    rank = (~keep).long() * 2 if last is None else 2 - keep.long() * 2 + (keep & last).long()
    width = keep.shape[1]
    # keys without ties (rank, then position): ONNX has no stable sort
    return (rank * width + torch.arange(width, device=keep.device)).argsort(dim=1)


def _row_index(lengths: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """[T] flattened padded positions of the valid tokens, computed on device without a sync."""
    batch = lengths.shape[0]
    image = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(total, device=lengths.device) - starts.index_select(0, image)
    return image * width + offset

