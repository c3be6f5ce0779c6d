"""The ZeRO partition layout, learned from the engine, against DeepSpeed's own full-parameter gather."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed


def _check_layout(rank, world_size, stage):
    import deepspeed

    from modeconn.export import gather_weights
    from modeconn.model import GPT, ModelConfig
    from modeconn.optim import OptimConfig, build_optimizer
    from modeconn.optim.zero_layout import flat_partitions, fragment_values, partition_layout

    # d=40 and vocab 1001 make sizes that 2 and 3 ranks cut in the middle of rows and of tensors
    cfg = ModelConfig.from_preset("tiny", n_embd=40, n_head=2, n_inner=120, vocab_size=1001, block_size=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, OptimConfig()), config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9})
    x = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x, x)[1])
    engine.step()

    layout = partition_layout(engine, model)
    partitions = flat_partitions(engine)
    mine = {(f.name, f.start): fragment_values(partitions, f).clone() for f in layout if f.rank == rank}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    oracle = gather_weights(model)  # DeepSpeed's safe_get_full_fp32_param, collective
    if rank == 0:
        for name, full in oracle.items():
            frags = [f for f in layout if f.name == name]
            assert sum(f.numel for f in frags) == full.numel(), name  # the fragments tile the parameter ...
            assert all(a.start + a.numel == b.start for a, b in zip(frags, frags[1:])), name  # ... without gaps
            assert len({f.rank for f in frags}) == len(frags)  # a rank holds one run of a parameter
            rebuilt = torch.cat([gathered[f.rank][(f.name, f.start)] for f in frags])
            assert torch.equal(rebuilt, full.view(-1)), name
        cut = [n for n in oracle if len({f.rank for f in layout if f.name == n}) > 1]
        assert cut, "no parameter is split between ranks: the test checks nothing"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_layout_rebuilds_every_parameter(stage, world_size):
    run_distributed(_check_layout, world_size, stage)
