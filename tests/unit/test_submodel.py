"""Unit tests for elfish_mpi.submodel: the physically smaller sub-network of kept neurons
computes exactly what the full model computes with those neurons masked out."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from elfish_mpi import submodel
from elfish_mpi.models import MaskableCNN, alexnet, lenet

torch.set_num_threads(1)

SPECS = {"lenet": lenet(), "alexnet": alexnet()}


def _full_flat(spec, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    flat = submodel.flat_params(MaskableCNN(spec))
    # non-zero biases everywhere, so a wrongly kept/dropped bias shows up in the outputs
    rng = np.random.default_rng(seed)
    for key, shape, off in submodel.layout(spec):
        if key.endswith(".bias"):
            flat[off : off + shape[0]] = rng.normal(0.0, 0.1, shape[0]).astype(np.float32)
    return flat


def _kept_sets(spec, kind: str) -> dict:
    rng = np.random.default_rng(42)
    kept = {}
    for layer in spec.layers:
        if not layer.maskable:
            continue
        if kind == "random":
            k = max(1, layer.out // 3)
            kept[layer.name] = np.sort(rng.choice(layer.out, size=k, replace=False))
        elif kind == "ordered":
            kept[layer.name] = np.arange(max(1, layer.out // 2))
        elif kind == "single":
            kept[layer.name] = np.array([layer.out - 1])
        elif kind == "full":
            kept[layer.name] = np.arange(layer.out)
        elif kind == "partial":  # only the first maskable layer is thinned
            kept[layer.name] = np.arange(layer.out) if kept else np.array([0, 3, 5])
    return kept


def _neuron_masks(spec, kept) -> dict:
    masks = {}
    for layer in spec.layers:
        if layer.name in kept:
            m = torch.zeros(layer.out)
            m[torch.as_tensor(np.asarray(kept[layer.name], dtype=np.int64))] = 1.0
            masks[layer.name] = m
    return masks


def _full_model(spec, flat) -> MaskableCNN:
    model = MaskableCNN(spec)
    submodel.load_flat(model, flat)
    return model


def _inputs(spec, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *spec.in_shape), generator=g)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("kind", ["random", "ordered", "single", "full", "partial"])
def test_submodel_matches_masked_full_model(spec_name, kind):
    # Prepare
    spec = SPECS[spec_name]
    flat = _full_flat(spec)
    kept = _kept_sets(spec, kind)
    x = _inputs(spec)
    full = _full_model(spec, flat)

    # Execute
    sub, idx = submodel.build_submodel(spec, kept, flat)
    with torch.no_grad():
        expected = full(x, neuron_masks=_neuron_masks(spec, kept))
        got = sub(x)

    # Assert
    assert sub.widths == submodel.widths_of(spec, kept)
    assert got.shape == expected.shape == (x.shape[0], spec.layers[-1].out)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # the masking actually matters (otherwise the comparison would be vacuous)
    if kind != "full":
        with torch.no_grad():
            unmasked = full(x)
        assert not torch.allclose(unmasked, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_submodel_gradients_match_masked_full_model(spec_name):
    # Prepare
    spec = SPECS[spec_name]
    flat = _full_flat(spec, seed=3)
    kept = _kept_sets(spec, "random")
    x = _inputs(spec, n=6)
    y = torch.arange(6) % spec.layers[-1].out
    full = _full_model(spec, flat)
    sub, idx = submodel.build_submodel(spec, kept, flat)

    # Execute
    F.cross_entropy(full(x, neuron_masks=_neuron_masks(spec, kept)), y).backward()
    F.cross_entropy(sub(x), y).backward()
    g_full = torch.cat([p.grad.reshape(-1) for p in full.parameters()]).numpy()
    g_sub = torch.cat([p.grad.reshape(-1) for p in sub.parameters()]).numpy()

    # Assert
    np.testing.assert_allclose(g_sub, g_full[idx], atol=1e-5, rtol=1e-4)
    outside = np.ones(g_full.size, dtype=bool)
    outside[idx] = False
    # a parameter outside the sub-network gets no gradient in the masked full model
    assert np.all(g_full[outside] == 0.0)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("kind", ["random", "ordered", "single", "full"])
def test_param_index_unique_and_sized_like_the_submodel(spec_name, kind):
    # Prepare
    spec = SPECS[spec_name]
    kept = _kept_sets(spec, kind)

    # Execute
    idx = submodel.param_index(spec, kept)
    sub = MaskableCNN(spec, submodel.widths_of(spec, kept))

    # Assert
    n_sub = sum(p.numel() for p in sub.parameters())
    assert idx.dtype == np.int64
    assert idx.size == n_sub
    assert idx.min() >= 0 and idx.max() < submodel.num_params(spec)
    assert np.bincount(idx, minlength=submodel.num_params(spec)).max() == 1  # no duplicates
    assert n_sub == spec.num_params(submodel.widths_of(spec, kept))


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_full_kept_gives_identity_index(spec_name):
    spec = SPECS[spec_name]
    n = submodel.num_params(spec)
    assert n == sum(p.numel() for p in MaskableCNN(spec).parameters()) == spec.num_params()
    np.testing.assert_array_equal(submodel.param_index(spec, submodel.full_kept(spec)), np.arange(n))
    np.testing.assert_array_equal(submodel.param_index(spec, {}), np.arange(n))


def test_scatter_then_gather_returns_the_values():
    # Prepare
    spec = SPECS["lenet"]
    kept = _kept_sets(spec, "random")
    idx = submodel.param_index(spec, kept)
    n = submodel.num_params(spec)
    values = np.random.default_rng(0).normal(size=idx.size).astype(np.float32)

    # Execute
    dense, mask = submodel.scatter(n, idx, values)

    # Assert
    assert dense.shape == mask.shape == (n,)
    np.testing.assert_array_equal(dense[idx], values)
    assert mask.sum() == idx.size
    assert np.all(mask[idx] == 1.0)
    assert np.all(dense[mask == 0] == 0.0)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_state_dict_round_trip(spec_name):
    # Prepare
    spec = SPECS[spec_name]
    flat = _full_flat(spec)

    # Execute
    state = submodel.state_dict_from_flat(spec, flat)
    back = submodel.flat_from_state_dict(spec, state)

    # Assert
    np.testing.assert_array_equal(back, flat)
    torch_state = MaskableCNN(spec).state_dict()
    assert list(state) == list(torch_state)
    for key, arr in state.items():
        assert arr.shape == tuple(torch_state[key].shape)
    # the state dict loads into a torch model whose flat vector is the same
    model = MaskableCNN(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_array_equal(submodel.flat_params(model), flat)


def test_flat_from_state_dict_rejects_a_wrong_shape():
    # Prepare
    spec = SPECS["lenet"]
    state = submodel.state_dict_from_flat(spec, _full_flat(spec))
    state["conv2.weight"] = state["conv2.weight"][:10]

    # Execute / Assert
    with pytest.raises(ValueError, match="conv2.weight"):
        submodel.flat_from_state_dict(spec, state)


def test_macs_of_lenet_by_hand_and_smaller_at_half_width():
    # Prepare
    spec = SPECS["lenet"]
    hand = 20 * 1 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10
    half = {layer.name: layer.out // 2 for layer in spec.layers if layer.maskable}
    hand_half = 10 * 1 * 25 * 24 * 24 + 25 * 10 * 25 * 8 * 8 + (25 * 16) * 250 + 250 * 10

    # Execute / Assert
    assert spec.macs() == hand
    assert spec.macs(half) == hand_half
    assert spec.macs(half) < spec.macs()
    a = SPECS["alexnet"]
    a_half = {layer.name: layer.out // 2 for layer in a.layers if layer.maskable}
    assert a.macs(a_half) < a.macs()


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_gradient_step_scattered_back_changes_only_kept_positions(spec_name):
    # Prepare
    spec = SPECS[spec_name]
    flat = _full_flat(spec, seed=5)
    before = flat.copy()
    kept = _kept_sets(spec, "random")
    sub, idx = submodel.build_submodel(spec, kept, flat)
    opt = torch.optim.SGD(sub.parameters(), lr=0.5)
    x = _inputs(spec, n=8)
    y = torch.arange(8) % spec.layers[-1].out

    # Execute
    opt.zero_grad()
    F.cross_entropy(sub(x), y).backward()
    opt.step()
    new_full = flat.copy()
    new_full[idx] = submodel.flat_params(sub)

    # Assert
    np.testing.assert_array_equal(flat, before)  # building the sub-network copies
    outside = np.ones(flat.size, dtype=bool)
    outside[idx] = False
    assert outside.any()
    assert new_full[outside].tobytes() == before[outside].tobytes()
    assert np.count_nonzero(new_full[idx] != before[idx]) > idx.size // 2


def test_export_keeps_the_neurons_with_the_largest_incoming_weights():
    from elfish_mpi.export import strongest
    from elfish_mpi.models import lenet

    # Prepare: conv1's neuron i has incoming weights of L1 norm 4 * |v[i]| (signs mixed)
    spec = lenet()
    state = {f"{layer.name}.weight": np.ones((layer.out, 4)) for layer in spec.layers}
    v = np.array([1, 2, 3, 50, 4, 40, 5, 6, 7, 60, 60, 8, 9, 10, 11, 12, 13, 30, 14, 15], dtype=float)
    state["conv1.weight"] = np.outer(v, [1, -1, 1, -1])
    # Execute: keep 0.25 of each layer (conv1: 5 of 20)
    kept = strongest(spec, state, 0.25)
    # Assert: the five largest norms (60, 60, 50, 40, 30), sorted by index; whole neurons per layer
    np.testing.assert_array_equal(kept["conv1"], [3, 5, 9, 10, 17])
    assert kept["conv2"].size == 13 and kept["fc1"].size == 125 and "fc2" not in kept
    np.testing.assert_array_equal(kept["conv2"], np.arange(13))  # all equal: the lowest indices
