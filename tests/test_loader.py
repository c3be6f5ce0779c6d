"""The window loader: determinism, epochs without replacement, rank slices, exact resume."""

import json

import numpy as np
import pytest
import torch.distributed as dist

from conftest import write_token_dir
from distributed import run_distributed
from modeconn.data.loader import TokenWindows, TrainLoader, ValidationSet
from modeconn.errors import DataError

BLOCK = 8


@pytest.fixture
def counting_dir(tmp_path):
    """Tokens 0, 1, 2, ... over three uneven shards: a window is identified by its first token."""
    tokens = np.arange(3 * 1001 + 500)
    return write_token_dir(tmp_path / "counting", {
        "train": [tokens[:1001], tokens[1001:2502], tokens[2502:]],
        "val": [np.arange(60_000, 60_000 + 321)],
    })


def window_ids(x):
    return [int(row[0]) for row in x]


def test_windows_are_shifted_pairs_within_shards(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    assert len(w) == 1000 // BLOCK + 1500 // BLOCK + (1001 - 1) // BLOCK  # windows never cross a shard
    x, y = w.batch(range(len(w)))
    assert x.shape == y.shape == (len(w), BLOCK)
    assert (y - x == 1).all() and (x[:, 1:] - x[:, :-1] == 1).all()


def test_order_is_deterministic_and_seeded(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    a = [window_ids(TrainLoader(w, 4, seed=1).next_batch()[0]) for _ in range(2)]
    b = TrainLoader(w, 4, seed=1)
    c = TrainLoader(w, 4, seed=2)
    assert a[0] == a[1] == window_ids(b.next_batch()[0])
    assert window_ids(c.next_batch()[0]) != a[0]


def test_each_epoch_visits_every_window_once(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    loader = TrainLoader(w, micro_batch=5, seed=0)
    steps = len(w) // 5
    epoch0 = [i for _ in range(steps) for i in window_ids(loader.next_batch()[0])]
    assert len(set(epoch0)) == len(epoch0) == steps * 5  # without replacement; the ragged end dropped
    first_next = window_ids(loader.next_batch()[0])
    assert loader.epoch == 1
    epoch1 = first_next + [i for _ in range(steps - 1) for i in window_ids(loader.next_batch()[0])]
    assert epoch1 != epoch0 and len(set(epoch1)) == len(epoch1)


def global_stream(w, micro_batch, world_size, steps, seed=0):
    """Per step, the windows of every rank, in rank order."""
    loaders = [TrainLoader(w, micro_batch, seed, rank=r, world_size=world_size) for r in range(world_size)]
    return [[window_ids(ld.next_batch()[0]) for ld in loaders] for _ in range(steps)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_do_not_overlap_and_match_one_process(counting_dir, world_size):
    w = TokenWindows(counting_dir, "train", BLOCK)
    steps = len(w) // (4 * world_size)
    stream = global_stream(w, 4, world_size, steps)
    for per_rank in stream:
        flat = [i for r in per_rank for i in r]
        assert len(set(flat)) == len(flat)
    single = global_stream(w, 4 * world_size, 1, steps)
    assert [[i for r in step for i in r] for step in stream] == [s[0] for s in single]


def _rank_windows(rank, world_size, data_dir, out_dir):
    w = TokenWindows(data_dir, "train", BLOCK)
    loader = TrainLoader(w, 3, seed=5, rank=dist.get_rank(), world_size=dist.get_world_size())
    mine = [window_ids(loader.next_batch()[0]) for _ in range(10)]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (out_dir / "windows.json").write_text(json.dumps(gathered))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_in_separate_processes(counting_dir, tmp_path, world_size):
    run_distributed(_rank_windows, world_size, counting_dir, tmp_path)
    gathered = json.loads((tmp_path / "windows.json").read_text())
    per_step = [[i for r in range(world_size) for i in gathered[r][s]] for s in range(10)]
    everything = [i for step in per_step for i in step]
    assert len(set(everything)) == len(everything) == 10 * 3 * world_size
    w = TokenWindows(counting_dir, "train", BLOCK)
    assert per_step == [s[0] for s in global_stream(w, 3 * world_size, 1, 10, seed=5)]


def test_resume_from_state_is_exact(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    run = TrainLoader(w, 6, seed=3)
    for _ in range(50):  # crosses into epoch 1 (63 steps per epoch)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # it is plain data
    expected = [window_ids(run.next_batch()[0]) for _ in range(30)]
    resumed = TrainLoader(w, 6, seed=3)
    resumed.load_state_dict(state)
    assert [window_ids(resumed.next_batch()[0]) for _ in range(30)] == expected
    assert resumed.state_dict() == run.state_dict()


def test_resume_at_another_world_size_continues_the_same_order(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    two = [TrainLoader(w, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        for ld in two:
            ld.next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # the same on every rank
    three = [TrainLoader(w, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    for ld in three:
        ld.load_state_dict(state)
    after = [i for _ in range(3) for ld in three for i in window_ids(ld.next_batch()[0])]
    one = TrainLoader(w, 12, seed=3)
    for _ in range(7):
        one.next_batch()
    assert after == [i for _ in range(3) for i in window_ids(one.next_batch()[0])]


def test_state_from_other_data_is_refused(counting_dir):
    w = TokenWindows(counting_dir, "train", BLOCK)
    state = TrainLoader(w, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1, this loader has seed=2"):
        TrainLoader(w, 4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="block_size=8, this loader has block_size=16"):
        TrainLoader(TokenWindows(counting_dir, "train", 16), 4, seed=1).load_state_dict(state)


def test_validation_windows_are_fixed_and_split_over_ranks(counting_dir):
    w = TokenWindows(counting_dir, "val", BLOCK)
    val = ValidationSet(w, n_windows=10)
    first = [window_ids(x) for x, _ in val.batches(3)]
    assert first == [window_ids(x) for x, _ in val.batches(3)]
    ids = [i for b in first for i in b]
    assert len(ids) == 10 and ids == sorted(ids) and ids[0] == 60_000 and ids[-1] > 60_000 + 200  # spread out
    for world_size in (2, 3):
        shares = [[i for x, _ in val.batches(2, r, world_size) for i in window_ids(x)] for r in range(world_size)]
        assert sorted(i for s in shares for i in s) == ids
    assert len(ValidationSet(w)) == len(w)


def test_too_little_data_is_a_clear_error(tmp_path, counting_dir):
    with pytest.raises(DataError, match="fewer than one window"):
        TokenWindows(counting_dir, "val", 400)
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        TrainLoader(TokenWindows(counting_dir, "val", BLOCK), 30, seed=0, world_size=2)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenWindows(counting_dir, "test", BLOCK)
    with pytest.raises(DataError, match="not a prepared token directory"):
        TokenWindows(tmp_path, "train", BLOCK)


def test_corrupt_shard_in_a_prepared_dir(counting_dir):
    shard = counting_dir / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_000001\.bin is truncated"):
        TokenWindows(counting_dir, "train", BLOCK)
