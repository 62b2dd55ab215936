"""evaluation.py: the test set in chunks that any rank can evaluate, with the same figures."""
import numpy as np
import pytest
import torch

from elfish_mpi.evaluation import CHUNK, EvalSplit, combine, evaluate, evaluate_chunks, image_range, num_chunks, shares
from elfish_mpi.models import get_spec, lenet, max_pool


def test_shares_cover_every_chunk_once_in_proportion_to_capacity():
    # Prepare / Execute: rank 0 counts as 1, then the quickstart fleet
    got = shares(num_chunks(10_000), [1.0, 1.0, 1.0, 0.5, 0.25])
    # Assert: contiguous, in rank order, all 100 chunks, proportional within one chunk
    assert got[0][0] == 0 and got[-1][1] == num_chunks(10_000) == 100
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    counts = np.array([b - a for a, b in got])
    np.testing.assert_allclose(counts, 100 * np.array([1, 1, 1, 0.5, 0.25]) / 3.75, atol=1)


def test_a_rank_of_weight_zero_gets_nothing_and_root_takes_all():
    assert shares(10, [1.0, 0.0, 1.0])[1] == (5, 5)
    assert EvalSplit(11, "root").split([1.0, 0.5], overlapped=True) == (11, ((11, 11), (11, 11)))
    assert image_range(1050, (10, 11)) == (1000, 1050)  # the last chunk is short


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -1.0], [1.0, float("nan")]])
def test_shares_refuse_weights_that_split_nothing(weights):
    with pytest.raises(ValueError, match="evaluation weights"):
        shares(10, weights)


def test_any_split_of_the_chunks_gives_the_same_figures_bit_for_bit():
    # Prepare: a LeNet and 7.3 chunks of images
    torch.manual_seed(0)
    model = lenet().init_module()
    n = 7 * CHUNK + 30
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    whole = evaluate(model, x, y)
    # Execute: the chunks evaluated by three "ranks" of unequal shares
    for split in ([1.0, 1.0, 1.0], [1.0, 0.25, 3.0], [0.0, 1.0, 0.0]):
        per_chunk = np.zeros((num_chunks(n), 2))
        for chunk_range in shares(num_chunks(n), split):
            a, b = image_range(n, chunk_range)
            per_chunk[chunk_range[0] : chunk_range[1]] = evaluate_chunks(model, x[a:b], y[a:b])
        # Assert
        assert combine(per_chunk, n) == whole, split
    assert 0.0 <= whole[0] <= 1.0 and whole[1] > 0


def test_combine_refuses_results_of_the_wrong_shape():
    with pytest.raises(ValueError, match="3 chunks"):
        combine(np.zeros((2, 2)), 250)


def test_the_split_gives_rank_0_what_it_can_do_while_the_workers_evaluate_and_train():
    # Prepare: 100 chunks, rank 0 at 10 ms a chunk, the workers' part at 20 ms a chunk
    split = EvalSplit(100, "all")
    caps = [1.0, 1.0, 0.5, 0.25]
    # Execute / Assert: the first split is by capacity, rank 0 counting as 1 (27 of 100)
    k0, ranges = split.split(caps, overlapped=True)
    assert k0 == 27 and ranges[0][0] == 27 and ranges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    split.observe(k0, 0.27, 100 - k0, 0.02 * (100 - k0))
    # no training to hide behind (after the last round): k0 * 0.01 = (100 - k0) * 0.02
    assert split.split(caps, overlapped=False)[0] == 66
    # while the workers train 2 s: rank 0 can take everything (0.8 * 2 s > 100 * 10 ms)
    split.observe_training(2.0)
    k0, ranges = split.split(caps, overlapped=True)
    assert k0 == 100 and all(a == b for a, b in ranges)
    # 0.5 s of training: k0 * 0.01 = 0.4 + (100 - k0) * 0.02
    split.observe_training(0.5)
    assert split.split(caps, overlapped=True)[0] == 80


@pytest.mark.parametrize("shape, k", [((7, 20, 24, 24), 2), ((3, 5, 9, 11), 2), ((2, 4, 9, 9), 3), ((1, 1, 2, 2), 2)])
def test_max_pool_without_autograd_selects_what_max_pool2d_selects(shape, k):
    # Prepare: ReLU outputs (ties at zero and between equal positives) and a NaN
    torch.manual_seed(0)
    x = torch.relu(torch.randn(*shape)).round(decimals=1)
    x[0, 0, 0, 0] = float("nan")  # first in its window
    x[-1, -1, 1, 1] = float("nan")  # last in its window
    if x.shape[2] >= 2 * k and x.shape[3] >= 2 * k:  # signed zeros tie, in another window
        x[0, 0, k : k + 2, k : k + 2] = torch.tensor([[0.0, -0.0], [-0.0, 0.0]])
    # Execute
    with torch.inference_mode():
        fast = max_pool(x, k)
    slow = torch.nn.functional.max_pool2d(x, k)
    # Assert: the same values (NaN where max_pool2d has it), bit for bit
    assert fast.shape == slow.shape
    assert torch.equal(torch.isnan(fast), torch.isnan(slow)) and bool(torch.isnan(slow).any())
    assert torch.equal(fast.nan_to_num(-1.0), slow.nan_to_num(-1.0))


@pytest.mark.parametrize("name, in_shape", [("lenet", (1, 28, 28)), ("alexnet", (3, 32, 32)), ("cnn-femnist", (1, 28, 28))])
def test_a_models_evaluation_gives_the_logits_of_its_training_forward_pass(name, in_shape):
    # Prepare: the model's forward pass with autograd (max_pool2d) and without (evaluate_chunks)
    spec = get_spec(name, 10, in_shape)
    torch.manual_seed(1)
    model = spec.init_module().eval()
    x = torch.randn(30, *in_shape)
    y = torch.randint(0, 10, (30,))
    # Execute
    with torch.enable_grad():
        logits = model(x)
    got = evaluate_chunks(model, x, y)
    # Assert
    assert logits.requires_grad
    logits = logits.detach()  # (the training forward pass's values; the loss below needs no graph)
    want = [[float((logits.argmax(1) == y).sum()), float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))]]
    assert got.tolist() == want
