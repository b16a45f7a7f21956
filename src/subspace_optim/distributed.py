"""torch.distributed: where a parameter's shard lies, and the few collectives a projected step needs.

The optimizer works on each projected weight as an *oriented* matrix G (d x D, the reduced side first). Under
FSDP2 (``fully_shard``) a weight W (m x n) is a DTensor sharded by rows (``Shard(0)``, torch.chunk sizes, so the
rows need not divide evenly); tensor parallelism adds a split of its rows (``ColwiseParallel``, which FSDP2 then
splits again: ``_StridedShard(0)``) or of its columns (``RowwiseParallel``: ``Shard(1)``). Each split of W splits
one axis of G:

- a split of d (the reduced side): R = Pᵀ G = Σᵢ Pᵢᵀ Gᵢ takes one all-reduce of r x D over the ranks that split
  it, after which R and the optimizer state are replicated over them. The update Pᵢ U is local.
- a split of D: Rᵢ = Pᵀ Gᵢ is local and the state is sharded like W on that mesh dimension (R's columns placed
  as W's rows or columns are), so torch.distributed.checkpoint can save and reshard it.

Bases are held whole (d x r) and identical on every rank: a random one is regenerated from its key on each rank
(no communication), an SVD one is computed by one owner rank per weight from the gathered gradient and broadcast,
so a refresh costs each rank 1/N of the SVDs. Under DDP the gradients are already identical on every rank; with
``process_group`` given, SVD refreshes are split among the ranks the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None

__all__ = ["Layout", "LOCAL", "layout_of", "local", "is_dtensor", "replicated_like"]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, anything else as it is."""
    return t.to_local() if is_dtensor(t) else t


def replicated_like(t: Tensor, like: Tensor) -> Tensor:
    """``t``, which every rank holds whole and alike, as a ``Replicate()`` DTensor on ``like``'s mesh when ``like`` is
    a DTensor (DTensor ops do not mix with plain tensors; no communication), else ``t`` itself."""
    if not is_dtensor(like):
        return t
    return DTensor.from_local(t, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


@dataclass(frozen=True)
class Axis:
    """This rank's slice ``[start, start + size)`` of one axis of G (``length`` long), and ``group``: the ranks
    that split it (None: the axis is whole here)."""

    start: int = 0
    size: int = 0
    length: int = 0
    group: object = None

    @property
    def split(self) -> bool:
        return self.group is not None


@dataclass(frozen=True)
class Block:
    """Where one rank's part of W (m x n, trailing dims flattened) lies: rows and columns, start and size."""

    row: int
    rows: int
    col: int
    cols: int


@dataclass(frozen=True)
class Layout:
    """How one parameter's oriented gradient (d x D) is spread over ranks.

    ``rows``/``cols``: this rank's slice of d and of D and the groups that split them; ``group``: every rank that
    holds a part (the owners of SVD refreshes gather and broadcast on it), or, when nothing is split, the
    data-parallel group that shares SVD refreshes; ``blocks``: each of ``group``'s ranks' part of W, for the gather;
    ``placements``: those of R (r x D) and of the state sharded like it: W's split of D moved to R's columns,
    ``Replicate()`` elsewhere.
    """

    rows: Axis = Axis()
    cols: Axis = Axis()
    group: object = None
    mesh: object = None
    placements: tuple = ()
    blocks: tuple = ()
    left: bool = True

    @property
    def sharded(self) -> bool:
        return self.rows.split or self.cols.split

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    # ------------------------------------------------------------------------------------- projection
    def basis_rows(self, basis: Tensor) -> Tensor:
        """The rows of the basis that meet this rank's part of G."""
        return basis[self.rows.start:self.rows.start + self.rows.size] if self.rows.split else basis

    def project(self, basis: Tensor, grad: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """R = Pᵀ G for this rank's part of G, computed in ``dtype`` (or wider: a float64 G stays float64), returned
        in float32 or wider: an all-reduce of r x D_i when the rows are split. A bfloat16 product is the backend's
        matmul (float32 accumulation on the CPU's oneDNN and in cuBLAS), rounded once."""
        wide = torch.promote_types(grad.dtype, torch.float32)
        compute = dtype if dtype == torch.bfloat16 else torch.promote_types(grad.dtype, dtype)
        lowrank = (self.basis_rows(basis).T.to(compute) @ grad.to(compute)).to(wide)
        if self.rows.split:
            dist.all_reduce(lowrank, group=self.rows.group)
        return lowrank

    def sum_(self, tensors: list[Tensor], over_cols: bool = False) -> list[Tensor]:
        """Sum partial results over every shard (``over_cols``: over the shards of D only, for a product of
        replicated-over-d pieces such as R Rᵀ) in one all-reduce; nothing to do where nothing is split."""
        group = self.cols.group if over_cols else (self.group if self.sharded else None)
        if group is None or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def embed_rows(self, part: Tensor) -> Tensor:
        """A d x k partial sum from this rank's rows of it (zeros elsewhere), for :meth:`sum_`."""
        if not self.rows.split:
            return part
        whole = part.new_zeros((self.rows.length,) + tuple(part.shape[1:]))
        whole[self.rows.start:self.rows.start + self.rows.size] = part
        return whole

    def local_cols(self, length: int) -> int:
        """This rank's count of D's ``length`` columns."""
        return self.cols.size if self.cols.split else length

    def wrap(self, t: Tensor) -> Tensor:
        """A low-rank tensor (r x D_i, local part) as the DTensor the rule and its state should be: its columns
        placed as W places D (sharded on the mesh dimensions that split D), replicated elsewhere. Not sharded: as
        is."""
        if not self.sharded:
            return t
        shape = tuple(t.shape[:-1]) + (self.cols.length if self.cols.split else t.shape[-1],)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(t, self.mesh, self.placements, run_check=False, shape=shape, stride=stride)

    # ------------------------------------------------------------------------- full matrices on an owner
    def owner(self, index: int) -> int:
        """The rank (in ``group``) that computes data-dependent refreshes of parameter ``index``."""
        return index % self.world

    def gather(self, part: Tensor, owner: int) -> Tensor | None:
        """Every rank's part of W (local m_i x n_j) put together on ``owner``: the whole m x n there, None
        elsewhere. Parts are padded to the largest for one ``gather``."""
        rows, cols = max(b.rows for b in self.blocks), max(b.cols for b in self.blocks)
        padded = part.new_zeros((rows, cols))
        padded[: part.shape[0], : part.shape[1]] = part
        mine = self.rank == owner
        bucket = [torch.empty_like(padded) for _ in self.blocks] if mine else None
        dist.gather(padded, bucket, group=self.group, group_dst=owner)
        if not mine:
            return None
        m, n = (self.rows.length, self.cols.length) if self.left else (self.cols.length, self.rows.length)
        whole = part.new_empty((m, n))
        for b, piece in zip(self.blocks, bucket):
            whole[b.row:b.row + b.rows, b.col:b.col + b.cols] = piece[:b.rows, :b.cols]
        return whole


LOCAL = Layout()


def _on_dim(placement, dim: int):
    """``placement`` (a Shard or _StridedShard of W) moved to tensor dimension ``dim``."""
    if isinstance(placement, _StridedShard):  # FSDP2 over a TP split
        return _StridedShard(dim, split_factor=placement.split_factor)
    return Shard(dim)


def _group_of(mesh, dims: list[int]):
    """The process group over mesh dimensions ``dims`` (one: its group; several: the flattened submesh's)."""
    if not dims:
        return None
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    sub = mesh if len(dims) == mesh.ndim else mesh[tuple(mesh.mesh_dim_names[i] for i in dims)]
    return sub._flatten().get_group()  # cached by torch: built once per mesh, collectively


def layout_of(p: Tensor, left: bool, process_group=None) -> Layout:
    """The layout of parameter ``p`` reduced on its ``left`` (rows) or right side.

    A DTensor may be sharded by rows (``Shard(0)``, FSDP2's, and TP's colwise split with FSDP2's
    ``_StridedShard(0)`` over it) on any mesh dimensions and, for a 2-D weight, by columns (``Shard(1)``, TP's
    rowwise split); ``Replicate()`` elsewhere (HSDP). Any other placement (``Partial``, a split of a trailing
    dimension of a 3-D weight, or an uneven-row layout that is not torch.chunk's) gets a clear error.
    """
    if is_dtensor(p):
        return _dtensor_layout(p, left)
    if process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return Layout(group=process_group)
    return LOCAL


def _dtensor_layout(p, left: bool) -> Layout:
    placements, mesh = tuple(p.placements), p.device_mesh
    by_dim = {0: [], 1: []}
    for i, pl in enumerate(placements):
        if pl.is_replicate():
            continue
        dim = getattr(pl, "dim", None)
        if not isinstance(pl, (Shard, _StridedShard)) or dim not in by_dim or (dim == 1 and p.dim() != 2):
            raise ValueError(
                f"projected DTensor parameters must be sharded by rows (FSDP2's Shard(0), TP's colwise split) or, "
                f"for a 2-D weight, by columns (TP's rowwise Shard(1)); got placements {placements} for shape "
                f"{tuple(p.shape)}")
        by_dim[dim].append(i)
    if not by_dim[0] and not by_dim[1]:
        return LOCAL
    m, n = p.shape[0], math.prod(p.shape[1:])
    split = by_dim[0] + by_dim[1]
    group = _group_of(mesh, sorted(split))
    coords = [_coordinate(mesh, r) for r in dist.get_process_group_ranks(group)]
    blocks = tuple(_block((m, n), mesh, c, placements) for c in coords)
    mine = blocks[dist.get_rank(group)]
    if (mine.rows, mine.cols) != tuple(local(p).reshape(local(p).shape[0], -1).shape):
        raise ValueError(f"unexpected shard {tuple(local(p).shape)} for shape {tuple(p.shape)} and placements "
                         f"{placements}")
    axes = {0: Axis(mine.row, mine.rows, m, _group_of(mesh, by_dim[0])),
            1: Axis(mine.col, mine.cols, n, _group_of(mesh, by_dim[1]))}
    d, D = (axes[0], axes[1]) if left else (axes[1], axes[0])
    # R's columns (dim 1) are placed as W places D; the splits of d are summed away (R replicated over them)
    splits_D = set(by_dim[1] if left else by_dim[0])
    placed = tuple(_on_dim(pl, 1) if i in splits_D else Replicate() for i, pl in enumerate(placements))
    return Layout(d, D, group, mesh, placed, blocks, left)


def _coordinate(mesh, global_rank: int) -> list[int]:
    """A rank's coordinate in ``mesh``."""
    return [int(i) for i in (mesh.mesh == global_rank).nonzero()[0]]


def _block(shape: tuple[int, int], mesh, coordinate: list[int], placements) -> Block:
    """The part of W (m x n) that the rank at ``coordinate`` holds (torch's own sharding arithmetic)."""
    size, offset = _compute_local_shape_and_global_offset(shape, mesh.shape, coordinate, placements)
    return Block(offset[0], size[0], offset[1], size[1])


@dataclass
class OwnedRefresh:
    """A data-dependent refresh of one parameter: ``compute(full oriented G) -> basis`` runs on one owner."""

    layout: Layout
    owner: int
    part: Tensor  # this rank's part of W (m_i x n_j); the whole W when not sharded
    orient: Callable[[Tensor], Tensor]  # whole W (m x n) -> oriented G (d x D)
    compute: Callable[[Tensor], Tensor]
    shape: tuple[int, int]  # (d, r) of the basis
    basis: Tensor | None = None


def run_owned(refreshes: list[OwnedRefresh]) -> None:
    """Compute every refresh once, on its owner, and give every rank the result (``basis``), in three phases so
    that the owners' SVDs run in parallel: gather each sharded gradient on its owner, compute what this rank owns,
    broadcast. The order of the collectives is the parameters' order, the same on every rank."""
    wholes = {}
    for i, job in enumerate(refreshes):
        if job.layout.sharded:
            wholes[i] = job.layout.gather(job.part, job.owner)
        elif job.layout.rank == job.owner:
            wholes[i] = job.part
    for i, job in enumerate(refreshes):
        if wholes.get(i) is not None:
            job.basis = job.compute(job.orient(wholes[i]))
    for job in refreshes:
        if job.layout.world == 1:
            continue
        if job.basis is None:
            job.basis = job.part.new_empty(job.shape, dtype=torch.promote_types(job.part.dtype, torch.float32))
        dist.broadcast(job.basis, group=job.layout.group, group_src=job.owner)
