"""Confusion-matrix metrics: exact values on hand-counted cases, bincount vs a naive count, DDP sum."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bloodcells.segmenter.metrics import ConfusionMatrix, all_reduce, metrics_from_confusion


def test_hand_counted_three_class_case() -> None:
    target = torch.tensor([[0, 0, 0], [1, 1, 2]])
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = truth, columns = prediction
    assert cm.matrix().tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = cm.compute()
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 2, 1])
    assert m["per_class_iou"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])  # tp / (true + pred - tp)
    assert m["per_class_dice"] == pytest.approx([4 / 5, 1 / 2, 2 / 3])  # 2 tp / (true + pred)
    assert m["miou"] == pytest.approx(0.5)
    assert m["mean_dice"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert metrics_from_confusion(np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])) == m  # the pure function


def test_absent_classes_are_nan_and_predicted_only_classes_count_as_zero() -> None:
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 1, 0]), np.array([0, 0, 255]))  # 255: outside 0..3, ignored
    m = cm.compute()
    assert m["pixel_accuracy"] == pytest.approx(1 / 2)
    assert m["per_class_iou"][:2] == pytest.approx([1 / 2, 0.0])
    assert math.isnan(m["per_class_iou"][2]) and math.isnan(m["per_class_iou"][3])
    assert math.isnan(m["per_class_accuracy"][1])  # class 1 was predicted but never true
    assert m["miou"] == pytest.approx(0.25)  # mean over classes in target or prediction: 0 and 1
    assert m["mean_dice"] == pytest.approx((2 / 3 + 0) / 2)


def test_empty_matrix_gives_nan_not_an_error() -> None:
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m["pixel_accuracy"]) and math.isnan(m["miou"]) and math.isnan(m["mean_dice"])


def test_bincount_equals_naive_count_on_random_data() -> None:
    rng = np.random.default_rng(0)
    k = 5
    cm = ConfusionMatrix(k)
    naive = np.zeros((k, k), dtype=np.int64)
    for _ in range(3):
        target = rng.integers(0, k, size=(2, 17, 19))
        pred = rng.integers(0, k, size=(2, 17, 19))
        cm.update(torch.from_numpy(pred), target.astype(np.uint8))
        for t, p in zip(target.ravel(), pred.ravel()):
            naive[t, p] += 1
    assert np.array_equal(cm.matrix(), naive)
    assert cm.compute()["pixel_accuracy"] == pytest.approx(np.trace(naive) / naive.sum())


def test_merge_equals_one_matrix_over_all_data() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, size=(2, 2, 8, 8))
    whole, part1, part2 = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    whole.update(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]))
    part1.update(a[0], a[1])
    part2.update(b[0], b[1])
    assert np.array_equal(part1.merge(part2).matrix(), whole.matrix())
    assert np.array_equal(ConfusionMatrix(4).merge(whole).matrix(), whole.matrix())


def test_bad_inputs_are_rejected() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="not logits"):
        cm.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="0..2"):
        cm.update(torch.full((4,), 3), torch.zeros(4, dtype=torch.long))


def test_reduce_is_a_noop_outside_ddp() -> None:
    assert not dist.is_initialized()
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    assert cm.reduce().matrix().tolist() == [[1, 1], [0, 1]]
    assert all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]


def _ddp_worker(rank: int, world: int, init: str, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cm = ConfusionMatrix(3)
    if rank == 0:  # rank 1 sees no data at all and must still join the sum
        cm.update(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    results[rank] = cm.reduce().matrix().tolist()
    dist.destroy_process_group()


def test_reduce_sums_over_ddp_processes(tmp_path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'store'}", results), nprocs=2)
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert results[0] == expected and results[1] == expected
