"""Unit tests for elfish_mpi.models and elfish_mpi.submodel: for every built-in model (and a
user's model with BatchNorm running statistics and a residual add), the physically smaller
sub-network of kept neurons computes exactly what the full network computes with those
neurons removed (every slice of theirs zeroed), in train and eval mode, with the same
gradients; an update maps back through the same indices and leaves every other value alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from elfish_mpi import submodel
from elfish_mpi.masking import make_masks
from elfish_mpi.models import ModelError, ModelSpec, discover_groups, get_spec, group

torch.set_num_threads(1)


class Residual(nn.Module):
    """A user's model: BatchNorm with running statistics and a residual add on one group."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = x + F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))


def residual_factory(num_classes, in_shape):
    bn = lambda p: [(f"{p}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")]  # noqa: E731
    slices = [("conv1.weight", 0), *bn("bn1"), ("conv2.weight", 1), ("conv2.weight", 0), *bn("bn2"), ("fc.weight", 1, 49)]
    return Residual(num_classes), [group("channels", 8, slices)]


class Depthwise(nn.Module):
    """A depthwise conv between two grouped layers, and an integer buffer outside the float state."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 14 * 14, num_classes)
        self.register_buffer("sign", torch.tensor(-1))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.dw(F.relu(self.conv(x)))), 2)
        return self.fc(torch.flatten(x * self.sign, 1))


def depthwise_factory(num_classes, in_shape):
    slices = [("conv.weight", 0), ("conv.bias", 0), ("dw.weight", 0), ("dw.bias", 0), ("fc.weight", 1, 196)]
    return Depthwise(num_classes), [group("channels", 8, slices)]


def residual_auto(num_classes, in_shape):
    return Residual(num_classes), "auto"


MODELS = {
    "lenet": lambda: get_spec("lenet", 10, (1, 28, 28)),
    "alexnet": lambda: get_spec("alexnet", 10, (3, 32, 32)),
    "cnn-femnist": lambda: get_spec("cnn-femnist", 62, (1, 28, 28)),
    "resnet18-static-bn": lambda: get_spec("resnet18", 10, (3, 32, 32), "static-bn"),
    "resnet18-group": lambda: get_spec("resnet18", 10, (3, 32, 32), "group"),
    "resnet18-none": lambda: get_spec("resnet18", 10, (3, 32, 32), "none"),
    "vit-tiny-28": lambda: get_spec("vit-tiny", 10, (1, 28, 28)),
    "vit-tiny-32": lambda: get_spec("vit-tiny", 10, (3, 32, 32)),
    "own": lambda: ModelSpec("own", lambda: residual_factory(10, (1, 28, 28)), (1, 28, 28), 10),
    "own-auto": lambda: ModelSpec("own-auto", lambda: residual_auto(10, (1, 28, 28)), (1, 28, 28), 10),
    "own-depthwise": lambda: ModelSpec("own-depthwise", lambda: depthwise_factory(10, (1, 28, 28)), (1, 28, 28), 10),
}


def _flat(spec, seed: int = 0) -> np.ndarray:
    """Initialised values, with every float entry perturbed (biases, norm parameters and running
    statistics away from 0/1), so that a wrongly kept or dropped slice shows in the outputs."""
    torch.manual_seed(seed)
    flat = submodel.flat_params(spec.init_module())
    rng = np.random.default_rng(seed)
    for key, shape, off in spec.entries:
        n = int(np.prod(shape))
        if len(shape) > 1 and not key.endswith(("cls", "pos")):
            continue  # (weights keep their initialisation: a deep net without norms stays in range)
        noise = rng.normal(0.0, 0.1, n).astype(np.float32)
        flat[off : off + n] = np.abs(flat[off : off + n] + noise) + 0.5 if key.endswith("running_var") else flat[off : off + n] + noise
    return flat


def _kept(spec, kind: str) -> dict:
    if kind == "full":
        return submodel.full_kept(spec)
    ratio = {"third": 1 / 3, "single": 1e-9}[kind]
    return make_masks(spec, {g.name: ratio for g in spec.groups}, "random", seed=7, round=3, worker=1)


def _removed(spec, flat: np.ndarray, kept: dict) -> np.ndarray:
    """The full flat state with every slice of every dropped neuron set to zero."""
    out = flat.copy()
    keep = np.zeros(flat.size, dtype=bool)
    keep[submodel.param_index(spec, kept)] = True
    for g in spec.groups:
        dropped = np.setdiff1d(np.arange(g.size), kept[g.name])
        for s in g.slices:
            key, shape, off = next(e for e in spec.entries if e[0] == s.tensor)
            view = out[off : off + int(np.prod(shape))].reshape(shape)
            idx = (dropped[:, None] * s.block + np.arange(s.block)[None, :]).ravel()
            np.moveaxis(view, s.axis, 0)[idx] = 0.0
    return out


def _inputs(spec, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *spec.in_shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["third", "single", "full"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_submodel_computes_the_full_network_without_the_dropped_neurons(name, kind, mode):
    # Prepare
    spec = MODELS[name]()
    flat = _flat(spec)
    kept = _kept(spec, kind)
    x = _inputs(spec, 6)
    y = torch.arange(6) % spec.num_classes
    full = submodel.full_model(spec, _removed(spec, flat, kept)).train(mode == "train")
    untouched = submodel.full_model(spec, flat).train(mode == "train")

    # Execute
    sub, idx = submodel.build_submodel(spec, kept, flat)
    sub.train(mode == "train")
    out_full, out_sub = full(x), sub(x)
    F.cross_entropy(out_full, y).backward()
    F.cross_entropy(out_sub, y).backward()

    # Assert: the same outputs and, at the kept positions, the same gradients; none outside
    assert out_sub.shape == (6, spec.num_classes)
    torch.testing.assert_close(out_sub, out_full, atol=2e-5, rtol=1e-4)
    g_full = torch.cat([p.grad.reshape(-1) for p in full.parameters()]).numpy()
    g_sub = torch.cat([p.grad.reshape(-1) for p in sub.parameters()]).numpy()
    params = np.concatenate([np.arange(off, off + int(np.prod(shape))) for key, shape, off in spec.entries if key in dict(spec.template.named_parameters())])
    pos = {p: i for i, p in enumerate(params)}
    sub_pos = np.asarray([pos[p] for p in idx if p in pos])
    np.testing.assert_allclose(g_sub, g_full[sub_pos], atol=5e-5, rtol=1e-3)
    outside = np.ones(g_full.size, dtype=bool)
    outside[sub_pos] = False
    assert np.abs(g_full[outside]).max(initial=0.0) <= 1e-6
    # the sub-network is physically smaller, and removing neurons matters (no vacuous comparison)
    if kind != "full":
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in untouched.parameters())
        with torch.no_grad():
            assert not torch.allclose(untouched(x), out_full.detach(), atol=1e-4)
        assert spec.macs(submodel.widths_of(spec, kept)) < spec.macs()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_training_step_scattered_back_changes_only_kept_positions(name):
    # Prepare: (the own model's running statistics move in training: they are kept positions too)
    spec = MODELS[name]()
    flat = _flat(spec, seed=5)
    before = flat.copy()
    kept = _kept(spec, "third")
    sub, idx = submodel.build_submodel(spec, kept, flat)
    sub.train()
    opt = torch.optim.SGD(sub.parameters(), lr=0.5)
    x = _inputs(spec, 8)

    # Execute
    opt.zero_grad()
    F.cross_entropy(sub(x), torch.arange(8) % spec.num_classes).backward()
    opt.step()
    new_full = flat.copy()
    new_full[idx] = submodel.flat_params(sub)

    # Assert
    np.testing.assert_array_equal(flat, before)  # building the sub-network copies
    outside = np.ones(flat.size, dtype=bool)
    outside[idx] = False
    assert outside.any()
    assert new_full[outside].tobytes() == before[outside].tobytes()
    assert np.count_nonzero(new_full[idx] != before[idx]) > idx.size // 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_param_index_is_unique_sized_like_the_submodel_and_full_is_identity(name):
    spec = MODELS[name]()
    for kind in ("third", "single"):
        kept = _kept(spec, kind)
        idx = submodel.param_index(spec, kept)
        sub = spec.module(submodel.widths_of(spec, kept))
        n_sub = sum(t.numel() for t in sub.state_dict().values() if t.is_floating_point())
        assert idx.dtype == np.int64 and idx.size == n_sub == spec.num_params(submodel.widths_of(spec, kept))
        assert idx.min() >= 0 and idx.max() < spec.flat_size
        assert np.bincount(idx, minlength=spec.flat_size).max() == 1
    n = spec.flat_size
    assert n == sum(t.numel() for t in spec.init_module().state_dict().values() if t.is_floating_point())
    np.testing.assert_array_equal(submodel.param_index(spec, submodel.full_kept(spec)), np.arange(n))
    np.testing.assert_array_equal(submodel.param_index(spec, {}), np.arange(n))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip(name):
    spec = MODELS[name]()
    flat = _flat(spec)
    state = submodel.state_dict_from_flat(spec, flat)
    np.testing.assert_array_equal(submodel.flat_from_state_dict(spec, state), flat)
    model = spec.init_module()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    np.testing.assert_array_equal(submodel.flat_params(model), flat)


def test_flat_from_state_dict_rejects_a_wrong_shape():
    spec = MODELS["lenet"]()
    state = submodel.state_dict_from_flat(spec, _flat(spec))
    state["conv2.weight"] = state["conv2.weight"][:10]
    with pytest.raises(ValueError, match="conv2.weight"):
        submodel.flat_from_state_dict(spec, state)


def test_macs_are_counted_from_the_module_lenet_by_hand():
    spec = MODELS["lenet"]()
    hand = 20 * 1 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10
    half = {"conv1": 10, "conv2": 25, "fc1": 250}
    hand_half = 10 * 1 * 25 * 24 * 24 + 25 * 10 * 25 * 8 * 8 + (25 * 16) * 250 + 250 * 10
    assert spec.macs() == hand
    assert spec.macs(half) == hand_half
    assert spec._poly is not None


@pytest.mark.parametrize("name", ["resnet18-static-bn", "vit-tiny-32", "own"])
def test_the_fitted_cost_polynomial_equals_the_flop_counter_everywhere_tried(name):
    spec = MODELS[name]()
    rng = np.random.default_rng(11)
    for _ in range(5):
        widths = {g.name: int(rng.integers(1, g.units + 1)) * g.unit for g in spec.groups}
        assert spec.macs(widths) == spec._count(spec._key(widths))
    assert spec._poly is not None


def test_units_are_kept_whole_heads_and_groupnorm_groups():
    vit = MODELS["vit-tiny-28"]()
    heads = next(g for g in vit.groups if g.name.endswith("heads"))
    assert heads.size == 4 and heads.slices[0].block == 16
    gn = MODELS["resnet18-group"]()
    for g in gn.groups:
        assert g.unit == 16
    kept = make_masks(gn, {g.name: 0.3 for g in gn.groups}, "random", seed=1, round=2, worker=0)
    for g in gn.groups:
        units = kept[g.name].reshape(-1, 16)
        np.testing.assert_array_equal(units - units[:, :1], np.tile(np.arange(16), (units.shape[0], 1)))
        assert np.all(units[:, 0] % 16 == 0)


def test_resnet18_streams_are_single_groups():
    spec = MODELS["resnet18-static-bn"]()
    names = spec.maskable
    assert names[:4] == ["layer1.stream", "layer2.stream", "layer3.stream", "layer4.stream"]
    assert len(names) == 4 + 8
    stream4 = {s.tensor for s in spec.group_of("layer4.stream").slices}
    assert {"layer4.0.conv2.weight", "layer4.1.conv2.weight", "layer4.0.shortcut.weight", "linear.weight", "n4.weight"} <= stream4
    assert "linear.bias" not in {s.tensor for g in spec.groups for s in g.slices}  # the classifier's outputs stay


def test_resnet18_at_a_quarter_costs_about_a_sixteenth():
    spec = MODELS["resnet18-static-bn"]()
    quarter = {g.name: g.size // 4 for g in spec.groups}
    assert 0.06 < spec.macs(quarter) / spec.macs() < 0.07


@pytest.mark.parametrize(
    "groups, message",
    [
        ([], "declares no neuron groups"),
        ([group("c", 8, [("conv1.weight", 0)])], "sub-networks do not run"),
        ([group("c", 8, [("conv9.weight", 0)])], "'conv9.weight' is not a floating-point tensor"),
        ([group("c", 4, [("conv1.weight", 0)])], "axis 0 of conv1.weight has 8 entries"),
        ([group("c", 8, [("fc.weight", 0)])], "axis 0 of fc.weight has 10 entries"),
        ([group("round", 8, [("conv1.weight", 0)])], "'round'"),
        ([group("a", 8, [("conv1.weight", 0)]), group("b", 8, [("conv1.weight", 0)])], "in groups a and b"),
    ],
)
def test_bad_groups_get_a_clear_message(groups, message):
    with pytest.raises(ModelError, match=message):
        ModelSpec("bad", lambda: (Residual(10), groups), (1, 28, 28), 10)


def test_a_group_that_cuts_the_classifier_outputs_is_refused():
    slices = [("fc.weight", 0), ("fc.bias", 0)]
    with pytest.raises(ModelError, match="cuts the classifier"):
        ModelSpec("bad", lambda: (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), [group("out", 10, [(f"1.{t}", 0) for t in ("weight", "bias")])]), (1, 28, 28), 10)
    assert slices  # (the same shape of mistake on the own model is covered above)


def test_unknown_models_and_factories_are_named():
    with pytest.raises(ModelError, match="unknown model 'resnet50'"):
        get_spec("resnet50", 10, (3, 32, 32))
    with pytest.raises(ModelError, match="cannot import no_such_module"):
        get_spec("no_such_module:factory", 10, (1, 28, 28))
    with pytest.raises(ModelError, match="has no callable 'nothing'"):
        get_spec("elfish_mpi.models:nothing", 10, (1, 28, 28))
    with pytest.raises(ModelError, match="must return"):
        ModelSpec("bad", lambda: Residual(10), (1, 28, 28), 10)
    with pytest.raises(ModelError, match="does not fit input images"):
        get_spec("lenet", 10, (1, 8, 8))


@pytest.mark.parametrize("name", ["lenet", "alexnet", "cnn-femnist", "resnet18-static-bn", "resnet18-group", "own"])
def test_discovered_groups_are_the_declared_ones(name):
    # Prepare: the hand-declared groups, and those torch-pruning's graph finds in the same module
    declared = MODELS[name]()
    with torch.device("meta"):
        module, _ = declared.factory()
    # Execute
    found = discover_groups(module, declared.in_shape)
    # Assert: the same slices, sizes and units (names: each group's root layer)
    key = lambda g: (tuple(sorted((s.tensor, s.axis, s.block) for s in g.slices)), g.size, g.unit)  # noqa: E731
    assert sorted(map(key, found)) == sorted(map(key, declared.groups))
    if name in ("lenet", "alexnet", "cnn-femnist"):
        assert [g.name for g in found] == declared.maskable  # (in module order: the same masks too)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.c = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4 * 24 * 24, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.c(torch.cat([self.a(x), self.b(x)], 1)), 1))


def test_discovery_refuses_what_it_cannot_cut_and_names_it():
    vit = MODELS["vit-tiny-28"]()
    with torch.device("meta"):
        module, _ = vit.factory()
    with pytest.raises(ModelError, match="LayerNorm would normalise over fewer features; declare the groups by hand"):
        discover_groups(module, vit.in_shape)
    with pytest.raises(ModelError, match="declare the groups by hand"):
        discover_groups(Concat(), (1, 28, 28))
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert [(g.name, g.size) for g in discover_groups(plain, (1, 28, 28))] == [("0", 4)]


class Normed(nn.Module):
    def __init__(self, norm: nn.Module, tied: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.norm = norm
        self.fc = nn.Linear(8 * 26 * 26, 10)
        if tied:
            self.again = self.fc

    def forward(self, x):
        return self.fc(torch.flatten(self.norm(self.conv(x)), 1))


@pytest.mark.parametrize(
    "norm, tied, slices, unit, message",
    [
        (nn.GroupNorm(2, 8), False, ["norm.weight", "norm.bias"], 1, "belongs to a GroupNorm of 4 channels a group"),
        (nn.GroupNorm(2, 8, affine=False), False, [], 4, "GroupNorm without affine parameters cannot be cut"),
        (nn.LayerNorm([8, 26, 26]), False, [], 1, "(see the test)"),
        (nn.Identity(), True, [], 1, "one tied tensor; tied weights are not supported"),
    ],
)
def test_what_cannot_be_cut_exactly_is_refused(norm, tied, slices, unit, message):
    if isinstance(norm, nn.LayerNorm):  # a LayerNorm's features in a group
        ln = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.LayerNorm(16), nn.Linear(16, 10))
        groups = [group("h", 16, [("1.weight", 0), ("1.bias", 0), ("2.weight", 0), ("2.bias", 0), ("3.weight", 1)])]
        with pytest.raises(ModelError, match="belongs to a LayerNorm, which would normalise over fewer features"):
            ModelSpec("bad", lambda: (ln, groups), (1, 28, 28), 10)
        return
    base = [("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1, 676)] + [(t, 0) for t in slices]
    with pytest.raises(ModelError, match=message):
        ModelSpec("bad", lambda: (Normed(norm, tied), [group("c", 8, base, unit)]), (1, 28, 28), 10)


def test_a_failing_forward_names_the_group_even_without_a_message():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.fc = nn.Linear(8 * 26 * 26, 10)

        def forward(self, x):
            assert self.conv.weight.shape[0] == 8
            return self.fc(torch.flatten(self.conv(x), 1))

    slices = [("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1, 676)]
    with pytest.raises(ModelError, match="group c: its sub-networks do not run \\(AssertionError"):
        ModelSpec("picky", lambda: (Picky(), [group("c", 8, slices)]), (1, 28, 28), 10)


def test_the_check_runs_the_training_forward_pass_and_leaves_the_random_state():
    class TrainOnly(nn.Module):  # a layer reached only in training reads the group, and is missing from it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.aux = nn.Conv2d(8, 8, 1)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(8 * 26 * 26, 10)

        def forward(self, x):
            h = self.drop(self.conv(x))
            if self.training:
                h = h + 0 * self.aux(h)
            return self.fc(torch.flatten(h, 1))

    slices = [("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1, 676)]
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    with pytest.raises(ModelError, match="group c: its sub-networks do not run"):
        ModelSpec("train-only", lambda: (TrainOnly(), [group("c", 8, slices)]), (1, 28, 28), 10)
    complete = slices + [("aux.weight", 0), ("aux.bias", 0), ("aux.weight", 1)]
    spec = ModelSpec("train-only", lambda: (TrainOnly(), [group("c", 8, complete)]), (1, 28, 28), 10)
    assert spec.maskable == ["c"]
    assert torch.equal(torch.random.get_rng_state(), state)  # (the check's dropout drew from a fork)


def test_the_check_passes_a_batchnorm_of_one_value_a_channel():
    # a BatchNorm1d after a Linear normalises one value a channel an image: valid for training
    # batches, and the check (in training mode) must not refuse it
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    slices = [("1.weight", 0), ("1.bias", 0), ("2.weight", 0), ("2.bias", 0), ("2.running_mean", 0),
              ("2.running_var", 0), ("4.weight", 1)]
    spec = ModelSpec("bn1d", lambda: (model, [group("h", 16, slices)]), (1, 28, 28), 10)
    out = spec.module({"h": 4}).train()(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_a_model_that_fails_whole_names_no_group():
    class Fail(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken whatever the widths")

    def factory():
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 10), Fail())

    slices = [("0.weight", 0), ("0.bias", 0), ("2.weight", 1, 676)]
    with pytest.raises(ModelError, match="model broken: its sub-networks do not run \\(RuntimeError: broken"):
        ModelSpec("broken", lambda: (factory(), [group("c", 8, slices)]), (1, 28, 28), 10)


def test_a_buffer_shared_by_two_layers_stays_shared():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(784, 8), nn.Linear(8, 10)
            scale = torch.full((1,), 2.0)
            self.a.register_buffer("scale", scale, persistent=False)
            self.b.register_buffer("scale", scale, persistent=False)

        def forward(self, x):
            return self.b(self.a(x.flatten(1)) * self.a.scale) * self.b.scale

    slices = [("a.weight", 0), ("a.bias", 0), ("b.weight", 1)]
    spec = ModelSpec("shared", lambda: (Shared(), [group("h", 8, slices)]), (1, 28, 28), 10)
    for module in (submodel.full_model(spec), spec.module({"h": 2})):
        assert module.a.scale is module.b.scale and float(module.b.scale) == 2.0


def test_buffers_outside_the_float_state_are_the_factorys_on_every_rank():
    spec = MODELS["own-depthwise"]()
    torch.manual_seed(0)
    reference = spec.init_module()
    for module in (submodel.full_model(spec), spec.module({"channels": 3})):
        assert torch.equal(module.sign, reference.sign) and int(module.sign) == -1
