"""Where each parameter's elements lie in every rank's ZeRO partition, learned from the engine.

ZeRO-1/2 flatten each parameter group and cut it into equal parts, one per rank, so a parameter
may be split between ranks at any element; ZeRO-3 cuts every parameter into equal parts (the last
padded). Either way a rank holds, per parameter, at most one contiguous run of its row-major
elements. A `Fragment` says which run, and where it sits in that rank's flat fp32 partition. The
layout is what a distributed optimizer needs to move whole matrices to the rank that
orthogonalises them (Muon), without any rank holding a full copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from modeconn.optim.roles import parameter_roles


@dataclass(frozen=True)
class Fragment:
    rank: int
    name: str  # parameter name
    start: int  # first element of the flattened parameter held by `rank`
    numel: int
    partition: int  # which of the rank's flat fp32 partitions (one per parameter group or sub-group)
    offset: int  # first element of the fragment in that partition


def zero3_partitioned(p: torch.Tensor) -> bool:
    """Whether `p` is a ZeRO-3 parameter: DeepSpeed gives those an id (and a partitioned ds_tensor)."""
    return hasattr(p, "ds_id")


def local_fragments(engine, model, rank: int) -> list[Fragment]:
    """This rank's fragments, from DeepSpeed's own bookkeeping (fragment mappings, ZeRO-3 positions)."""
    opt = engine.optimizer
    out = []
    for name, p, _ in parameter_roles(model):
        if zero3_partitioned(p):
            partition, offset, length = opt.grad_position[opt.get_param_id(p)]
            start = p.ds_tensor.ds_numel * dist.get_rank(group=opt.dp_process_group)
            numel = max(0, min(length, p.ds_numel - start))  # the last rank's slice is padded
            if numel:
                out.append(Fragment(rank, name, start, numel, partition, offset))
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2 (and bf16): a run of the flat group
            m = p._hp_mapping
            out.append(Fragment(rank, name, m.lp_fragment_address.start, m.lp_fragment_address.numel,
                                m.param_group_index, m.hp_fragment_address.start))
        elif not hasattr(p, "_hp_mapping"):
            raise RuntimeError(f"{name} lies in no ZeRO partition (at ZeRO-0 fp32 every rank holds it whole; "
                               f"flat_partitions is None there, and nothing needs a layout)")
    return out


def partition_layout(engine, model) -> list[Fragment]:
    """Every rank's fragments (collective: all ranks call it), sorted by parameter and start."""
    mine = local_fragments(engine, model, dist.get_rank())
    everyone: list[list[Fragment]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    return sorted((f for frags in everyone for f in frags), key=lambda f: (f.name, f.start, f.rank))


def fragment_values(partitions: list[torch.Tensor], fragment: Fragment) -> torch.Tensor:
    """The elements of `fragment` on this rank: a view into its flat partition."""
    return partitions[fragment.partition].narrow(0, fragment.offset, fragment.numel)


def flat_partitions(engine) -> Optional[list[torch.Tensor]]:
    """The flat fp32 partitions a DeepSpeed wrapper steps (indexed as `Fragment.partition`), whose
    entries in the optimizer's state hold its state; None at ZeRO-0 fp32, where the client optimizer
    steps the parameters themselves."""
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups",  # ZeRO-1/2: one per parameter group
                 "fp32_partitioned_groups_flat",  # ZeRO-3: one per sub-group (in param_groups only during step())
                 "fp32_groups_flat_partition"):  # bf16 at ZeRO-0: one per parameter group
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def partition_param_group(engine, partition: int) -> int:
    """The client optimizer's parameter group that flat partition `partition` belongs to."""
    return engine.optimizer.sub_group_to_group_id[partition] if hasattr(engine.optimizer, "sub_group_to_group_id") \
        else partition
