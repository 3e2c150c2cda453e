import torch

from raygpt.data.sampler import GlobalBatchSampler


def samples(n=103, batch=8, world=1, seed=1, epoch=0, start=0):
    out = []
    for rank in range(world):
        s = GlobalBatchSampler(range(n), batch, rank, world, seed)
        s.set_position(epoch, start)
        out.append(list(s))
    return out


def test_epoch_is_a_permutation_without_the_last_partial_batch():
    (order,) = samples()
    assert len(order) == 96 and len(set(order)) == 96 and set(order) <= set(range(103))


def test_each_step_sees_the_same_samples_on_any_worker_count():
    (one,) = samples(world=1)
    two = samples(world=2)
    four = samples(world=4)
    for k in range(12):
        batch = set(one[8 * k: 8 * k + 8])
        assert batch == set(two[0][4 * k: 4 * k + 4]) | set(two[1][4 * k: 4 * k + 4])
        assert batch == set().union(*(set(four[r][2 * k: 2 * k + 2]) for r in range(4)))


def test_reshuffles_each_epoch_and_repeats_with_the_seed():
    assert samples(epoch=0) != samples(epoch=1)
    assert samples(epoch=1) == samples(epoch=1)
    assert samples(seed=2) != samples(seed=1)


def test_start_mid_epoch_continues_the_same_order():
    (full,) = samples()
    (rest,) = samples(start=5)
    assert rest == full[40:]
    assert len(GlobalBatchSampler(range(103), 8, 0, 1, 1)) == 96


def test_len_counts_per_rank_samples_left():
    s = GlobalBatchSampler(range(103), 8, 1, 2, 0)
    s.set_position(3, 10)
    assert len(s) == len(list(s)) == 2 * 4


def test_is_a_distributed_sampler_so_ray_keeps_it():
    assert isinstance(GlobalBatchSampler(range(10), 2, 0, 1, 0), torch.utils.data.DistributedSampler)
