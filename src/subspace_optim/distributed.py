"""torch.distributed: where a parameter's shard lies, and the few collectives a projected step needs.

The optimizer works on each projected weight as an *oriented* matrix G (d x D, the reduced side first). Under
FSDP2 (``fully_shard``) a weight W (m x n) is a DTensor sharded by rows (``Shard(0)``, torch.chunk sizes, so the
rows need not divide evenly), which splits one axis of G:

- left projection (d = m): the rows of G are split. R = Pᵀ G = Σᵢ Pᵢᵀ Gᵢ takes one all-reduce of r x D, after
  which R and the optimizer state (r x D) are replicated. The update Pᵢ U is local.
- right projection (D = m): the columns of G are split. Rᵢ = Pᵀ Gᵢ is local and the state is sharded like W
  (a ``Shard(1)`` DTensor of r x D), so torch.distributed.checkpoint can save and reshard it.

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


def chunk_sizes(length: int, parts: int) -> list[int]:
    """Row counts of ``Shard(0)`` over ``parts`` ranks (torch.chunk: ceil(length / parts) each, the rest last)."""
    size = -(-length // parts) if parts else 0
    return [max(0, min(size, length - i * size)) for i in range(parts)]


@dataclass(frozen=True)
class Layout:
    """How one parameter's oriented gradient (d x D) is spread over ranks.

    ``split``: ``"none"`` (whole on every rank), ``"rows"`` (d split: left projection of an FSDP2 shard) or
    ``"cols"`` (D split: right projection of an FSDP2 shard); ``start``/``size``: this rank's slice of the split
    axis; ``group``: the shard group, or (``split="none"``) the data-parallel group that shares SVD refreshes.
    """

    split: str = "none"
    start: int = 0
    size: int = 0
    length: int = 0
    group: object = None
    mesh: object = None
    mesh_dim: int = 0
    placements: tuple = ()

    @property
    def sharded(self) -> bool:
        return self.split != "none"

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    # ------------------------------------------------------------------------------------- projection
    def basis_rows(self, basis: Tensor) -> Tensor:
        """The rows of the basis that meet this rank's part of G."""
        return basis[self.start:self.start + self.size] if self.split == "rows" else basis

    def project(self, basis: Tensor, grad: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """R = Pᵀ G for this rank's part of G, computed in ``dtype`` (or wider: a float64 G stays float64), returned
        in float32 or wider: an all-reduce of r x D when the rows are split. A bfloat16 product is the backend's
        matmul (float32 accumulation on the CPU's oneDNN and in cuBLAS), rounded once."""
        wide = torch.promote_types(grad.dtype, torch.float32)
        compute = dtype if dtype == torch.bfloat16 else torch.promote_types(grad.dtype, dtype)
        lowrank = (self.basis_rows(basis).T.to(compute) @ grad.to(compute)).to(wide)
        if self.split == "rows":
            dist.all_reduce(lowrank, group=self.group)
        return lowrank

    def sum_(self, tensors: list[Tensor]) -> list[Tensor]:
        """Sum partial results over the shards in one all-reduce (nothing to do when G is whole)."""
        if not self.sharded or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def embed_rows(self, part: Tensor) -> Tensor:
        """A d x k partial sum from this rank's rows of it (zeros elsewhere), for :meth:`sum_`."""
        if self.split != "rows":
            return part
        whole = part.new_zeros((self.length,) + tuple(part.shape[1:]))
        whole[self.start:self.start + self.size] = part
        return whole

    def wrap(self, t: Tensor) -> Tensor:
        """A low-rank tensor (r x D, local part) as the DTensor the rule and its state should be.

        Right projection: ``Shard(1)`` (sharded like W); left projection: ``Replicate()``. Not sharded: as is.
        """
        if not self.sharded:
            return t
        placements = [Replicate()] * len(self.placements)
        if self.split == "cols":
            placements[self.mesh_dim] = Shard(t.dim() - 1)
            shape = tuple(t.shape[:-1]) + (self.length,)
        else:
            shape = tuple(t.shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(t, self.mesh, placements, run_check=False, shape=shape, stride=stride)

    # ------------------------------------------------------------------------- full matrices on an owner
    def owner(self, index: int) -> int:
        """The rank (in ``group``) that computes data-dependent refreshes of parameter ``index``."""
        return index % self.world

    def gather_rows(self, rows: Tensor, owner: int) -> Tensor | None:
        """Stack every rank's rows of W (local m_i x n) on ``owner``: the whole m x n there, None elsewhere."""
        sizes = chunk_sizes(self.length, self.world)
        padded = rows.new_zeros((sizes[0],) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        mine = self.rank == owner
        bucket = [torch.empty_like(padded) for _ in sizes] if mine else None
        dist.gather(padded, bucket, group=self.group, group_dst=owner)
        return torch.cat([b[:s] for b, s in zip(bucket, sizes)]) if mine else None


LOCAL = Layout()


def layout_of(p: Tensor, left: bool, process_group=None) -> Layout:
    """The layout of parameter ``p`` reduced on its ``left`` (rows) or right side.

    A DTensor must be sharded along dim 0 on at most one mesh dimension (FSDP2's ``Shard(0)``, optionally with
    ``Replicate()`` on others as in HSDP); any other placement gets a clear error.
    """
    if is_dtensor(p):
        placements = tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
        if not shard_dims:
            return LOCAL
        if len(shard_dims) > 1 or not placements[shard_dims[0]].is_shard(0):
            raise ValueError(
                f"projected DTensor parameters must be sharded by rows (FSDP2's Shard(0)) on one mesh dimension; "
                f"got placements {placements} for shape {tuple(p.shape)}"
            )
        mesh_dim = shard_dims[0]
        mesh = p.device_mesh
        group = mesh.get_group(mesh_dim)
        sizes = chunk_sizes(p.shape[0], dist.get_world_size(group))
        rank = dist.get_rank(group)
        size = local(p).shape[0]
        if size != sizes[rank]:
            raise ValueError(f"unexpected shard of {size} rows (expected {sizes[rank]}) for shape {tuple(p.shape)}")
        return Layout("rows" if left else "cols", sum(sizes[:rank]), size, p.shape[0], group, mesh, mesh_dim,
                      placements)
    if process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return Layout(group=process_group)
    return LOCAL


@dataclass
class OwnedRefresh:
    """A data-dependent refresh of one parameter: ``compute(full oriented G) -> basis`` runs on one owner."""

    layout: Layout
    owner: int
    rows: Tensor  # this rank's rows of W (m_i x n); the whole W when not sharded
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
            wholes[i] = job.layout.gather_rows(job.rows, job.owner)
        elif job.layout.rank == job.owner:
            wholes[i] = job.rows
    for i, job in enumerate(refreshes):
        if wholes.get(i) is not None:
            job.basis = job.compute(job.orient(wholes[i]))
    for job in refreshes:
        if job.layout.world == 1:
            continue
        if job.basis is None:
            job.basis = job.rows.new_empty(job.shape, dtype=torch.promote_types(job.rows.dtype, torch.float32))
        dist.broadcast(job.basis, group=job.layout.group, group_src=job.owner)
