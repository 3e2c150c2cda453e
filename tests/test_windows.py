"""Training windows over prepared shards (raygpt.data.windows)."""

import pickle

import pytest
import torch
from helpers import folder_with_shards

from raygpt.data.windows import WindowDataset, num_windows


@pytest.mark.parametrize(
    "tokens, ctx, stride, expected",
    [(100, 10, 10, 9), (101, 10, 10, 10), (11, 10, 10, 1), (10, 10, 10, 0), (5, 10, 1, 0),
     (100, 10, 1, 90), (100, 10, 5, 18), (1000, 128, 64, 14)],
)
def test_num_windows_matches_the_recipe(tokens, ctx, stride, expected):
    assert num_windows(tokens, ctx, stride) == expected == len(range(0, tokens - ctx, stride))


def test_windows_run_over_the_concatenation_of_shards(tmp_path):
    folder = folder_with_shards(tmp_path, [7, 3, 1, 20])  # 31 tokens
    ds = WindowDataset(folder, "train", context_len=8, stride=4)
    assert len(ds) == num_windows(31, 8, 4) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == (8,)
        assert x.tolist() == list(range(4 * i, 4 * i + 8))  # crosses shards 0->1->2->3
        assert y.tolist() == list(range(4 * i + 1, 4 * i + 9))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_window_default_stride_is_context_len(tmp_path):
    ds = WindowDataset(folder_with_shards(tmp_path, [50]), "train", context_len=10)
    assert len(ds) == 4 and ds[1][0][0].item() == 10


def test_dataset_pickles_without_the_mapped_arrays(tmp_path):

    ds = WindowDataset(folder_with_shards(tmp_path, [40]), "train", context_len=8)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and torch.equal(clone[2][0], ds[2][0])


