"""The one module that calls torch.distributed collectives.

Everything else asks here, so single-process code (tests, a 1-worker run, the CPU reference paths)
runs unchanged: with no process group every helper is the identity.
"""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist


def init_group(backend: str, rank: int, world: int, address: str, port: int) -> None:
    """Join a process group rendezvousing at rank 0's address:port (launchers that are not Ray Train)."""
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)


def serve_store_on_loopback() -> tuple[int, Any]:
    """Start a rendezvous store server that listens on 127.0.0.1 only; its port, and the store (keep
    it alive: the process group goes on using the server).

    torch's TCPStore listens on every interface whatever host it is given; only a socket handed to it
    (master_listen_fd) decides where. init_process_group's own store (env:// or tcp://, multi-tenant)
    then finds this server on its port in the same process and reuses it instead of starting one."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, None, True, multi_tenant=True, wait_for_workers=False,
                          master_listen_fd=sock.detach())  # fmt: skip
    return port, store


def close_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend() -> str:
    """The process group's backend (gloo, nccl)."""
    return str(dist.get_backend())


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns t."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    all_reduce_sum(t)
    return t.div_(world_size())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def share_owned(
    mine: dict[str, torch.Tensor], owners: dict[str, int], numels: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Every rank gets every named 1-D float32 tensor from the rank that owns it: one broadcast per
    owning rank (names in sorted order), whatever the number of tensors."""
    if not is_distributed():
        return dict(mine)
    out = {}
    for src in range(world_size()):
        names = sorted(n for n, o in owners.items() if o == src)
        if not names:
            continue
        sizes = [numels[n] for n in names]
        # over the CPU (gloo) side of the group: every rank's buffer must be on the same device
        buf = torch.cat([mine[n].cpu() for n in names]) if src == rank() else torch.empty(sum(sizes))
        dist.broadcast(buf, src=src)
        out.update(zip(names, buf.split(sizes)))
    return out


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- sparse selection
# Global top-n over tensors that are split across ranks, without ever moving a dense tensor:
# the n-th largest value is found by bisection on integer keys (one all-reduce of one count per
# layer per step), ties at the threshold go to the lowest global indices, and only the chosen
# positions (the mask changes) are all-gathered, as index lists or bitmasks, whichever is smaller.


_KEY_LOW, _KEY_HIGH = -(2**31) - 1, 2**31  # below / above every key of a float32


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of float32 values to int64 keys (so thresholds are searched exactly)."""
    b = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, -(b & 0x7FFFFFFF) - 1)


class WireBytes:
    """Bytes each rank puts into collectives, summed over ranks (what crosses the network)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, per_rank: int, ranks: int | None = None) -> None:
        self.total += per_rank * (world_size() if ranks is None else ranks)


# Ranks hold a tensor in one of two ways: as slices that partition it (ZeRO-1/2/3), or each the same
# whole copy (ZeRO-0's replicas; the model before DeepSpeed partitions it, where SNIP scores it).
# Every entry must be counted by exactly one rank, or a global top-n counts a replicated entry once
# per rank and keeps n / world of them: `owned_ranges` gives each rank its part of a replica.


def owned_ranges(starts: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """For each tensor, the global range [lo, hi) of this rank's slice [start, start + length) that
    this rank decides for: the slice itself where the ranks' slices partition the tensor, an even
    contiguous share of it where every rank holds the same slice (a replica). One small all-gather."""
    ranges = [(s, s + n) for s, n in zip(starts, lengths)]
    if not is_distributed() or world_size() == 1 or not ranges:
        return ranges
    # on the CPU (the gloo side of the group): a few integers, needed on the host
    everyone = all_gather_tensor(torch.tensor([starts, lengths], dtype=torch.int64))
    r, w = rank(), world_size()
    out = []
    for l, (s, n) in enumerate(zip(starts, lengths)):
        replica = n > 0 and all(int(e[0, l]) == s and int(e[1, l]) == n for e in everyone)
        out.append((s + n * r // w, s + n * (r + 1) // w) if replica else ranges[l])
    return out


def assemble(slices: list[torch.Tensor], starts: list[int], numels: list[int],
             wire: WireBytes | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Whole 1-D tensors from every rank's slices (partitions or replicas), identical on all ranks and
    bit-equal to the owners' values: each entry is summed from one rank's value and zeros (exact).
    Dense (numel values per tensor on the wire): for one-off decisions that need whole layers."""
    ranges = owned_ranges(starts, [t.numel() for t in slices])
    out = []
    for t, s, (lo, hi), numel in zip(slices, starts, ranges, numels):
        full = torch.zeros(numel, dtype=t.dtype, device=t.device)
        full[lo:hi] = t[lo - s : hi - s]
        out.append(all_reduce_sum(full))
        if wire is not None:
            wire.add(full.numel() * full.element_size())
    return out


def global_select(
    keys: list[torch.Tensor], valid: list[torch.Tensor], starts: list[int], counts: list[int],
    wire: WireBytes | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """For each layer l, the global indices of the counts[l] largest keys among valid entries.

    keys[l], valid[l]: this rank's contiguous slice [starts[l], starts[l] + len) of layer l, flattened
    (a partition of the layer over ranks, or a replica on every rank: see `owned_ranges`).
    Returns sorted int64 global indices, identical on every rank. Raises if a layer has fewer valid
    entries than requested.
    """
    wire = wire or WireBytes()
    L = len(keys)
    owned = owned_ranges(starts, [k.numel() for k in keys])
    wire.add(16 * L)
    keys = [k[lo - s : hi - s] for k, s, (lo, hi) in zip(keys, starts, owned)]
    valid = [v[lo - s : hi - s] for v, s, (lo, hi) in zip(valid, starts, owned)]
    starts = [lo for lo, _ in owned]
    # the search runs where the slices are (the GPU under CUDA training); only the chosen indices
    # leave it, to be encoded for the all-gather
    dev = keys[0].device if keys else torch.device("cpu")
    keys = [torch.where(v, k, torch.full_like(k, _KEY_LOW)) for k, v in zip(keys, valid)]
    want = torch.tensor(counts, dtype=torch.int64, device=dev)
    have = all_reduce_sum(torch.stack([v.sum() for v in valid]).to(torch.int64))
    wire.add(8 * L)
    if torch.any(have < want):
        bad = int(torch.nonzero(have < want)[0])
        raise ValueError(f"layer {bad}: {int(want[bad])} entries requested, only {int(have[bad])} eligible")
    # invariant: count(key >= lo) >= want and count(key >= hi) < want
    lo = torch.full((L,), _KEY_LOW + 1, dtype=torch.int64, device=dev)
    hi = torch.full((L,), _KEY_HIGH, dtype=torch.int64, device=dev)
    active = want > 0
    ordered = [torch.sort(k[v]).values for k, v in zip(keys, valid)]  # sort once; each round is a search
    while bool(torch.any(active & (hi - lo > 1))):
        mid = (lo + hi) // 2
        local = [o.numel() - torch.searchsorted(o, m.view(1)) for o, m in zip(ordered, mid)]
        c = all_reduce_sum(torch.cat(local).to(torch.int64) if local else torch.zeros(0, dtype=torch.int64, device=dev))
        wire.add(8 * L)
        ok = c >= want
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    threshold = lo
    above = [torch.nonzero(k > t).flatten() for k, t in zip(keys, threshold)]
    tied = [torch.nonzero(k == t).flatten() for k, t in zip(keys, threshold)]
    # ties go to the lowest global indices: every rank learns every rank's (start, tie count)
    above_total = all_reduce_sum(torch.tensor([a.numel() for a in above], dtype=torch.int64, device=dev)).cpu()
    info = [i.cpu() for i in all_gather_tensor(
        torch.tensor([[s, t.numel()] for s, t in zip(starts, tied)], dtype=torch.int64, device=dev))]
    wire.add(8 * L + 16 * L)
    chosen_local = []
    for l in range(L):
        if counts[l] == 0:
            chosen_local.append(torch.empty(0, dtype=torch.int64, device=dev))
            continue
        need = counts[l] - int(above_total[l])
        before = sum(int(row[l, 1]) for row in info if int(row[l, 0]) < starts[l])
        take = max(0, min(need - before, tied[l].numel()))
        local = torch.cat([above[l], tied[l][:take]])
        chosen_local.append(local + starts[l])
    chosen = _all_gather_changes(chosen_local, starts, [k.numel() for k in keys], wire)
    return [c.to(dev) for c in chosen]


def _encode(idx: torch.Tensor, start: int, length: int) -> tuple[int, bytes]:
    """Index list (4 bytes each) or bitmask of the slice, whichever is smaller."""
    import numpy as np

    rel = (idx - start).cpu().numpy().astype(np.int64)
    if 4 * rel.size <= (length + 7) // 8:
        return 0, rel.astype(np.int32).tobytes()
    bits = np.zeros(length, dtype=bool)
    bits[rel] = True
    return 1, np.packbits(bits).tobytes()


def _decode(mode: int, payload: bytes, start: int, length: int) -> torch.Tensor:
    import numpy as np

    if mode == 0:
        rel = np.frombuffer(payload, dtype=np.int32).astype(np.int64)
    else:
        rel = np.nonzero(np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:length])[0]
    return torch.from_numpy(rel.copy()) + start


def _all_gather_changes(chosen, starts, lengths, wire: WireBytes) -> list[torch.Tensor]:
    encoded = [_encode(c, s, n) for c, s, n in zip(chosen, starts, lengths)]
    # header per layer: (mode, payload bytes, slice start, slice length), then the payloads
    header = torch.tensor([[m, len(p), s, n] for (m, p), s, n in zip(encoded, starts, lengths)], dtype=torch.int64)
    blob = torch.frombuffer(bytearray(b"".join(p for _, p in encoded) or b"\0"), dtype=torch.uint8)
    headers = all_gather_tensor(header)
    blobs = all_gather_varlen(blob)
    wire.add(header.numel() * 8 + 8)  # headers, and each rank's payload size for the padded gather
    wire.add(sum(b.numel() for b in blobs), ranks=1)
    out: list[list[torch.Tensor]] = [[] for _ in chosen]
    for h, b in zip(headers, blobs):
        raw, offset = b.numpy().tobytes(), 0
        for l in range(len(chosen)):
            mode, size, start, length = (int(v) for v in h[l])
            out[l].append(_decode(mode, raw[offset : offset + size], start, length))
            offset += size
    return [torch.sort(torch.cat(parts)).values for parts in out]


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Equal-shaped tensors from every rank, in rank order."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def all_gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
    """1-D tensors of different lengths from every rank (padded all_gather), in rank order."""
    if not is_distributed():
        return [t]
    sizes = all_gather_tensor(torch.tensor([t.numel()], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = all_gather_tensor(padded)
    return [o[: int(s.item())] for o, s in zip(out, sizes)]


# ----------------------------------------------------------------------------- expert parallelism
class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks in order (send[r] rows to rank r); backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        ctx.send, ctx.recv = send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv)
        return back, None, None


def exchange_counts(send: torch.Tensor) -> torch.Tensor:
    """send[r] = rows this rank sends to rank r → recv[r] = rows rank r sends to this rank."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous())
    return recv


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """Differentiable all-to-all with uneven splits (gloo and NCCL)."""
    if not is_distributed():
        return x
    return _AllToAll.apply(x, send, recv)
