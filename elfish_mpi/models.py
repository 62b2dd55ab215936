"""Models and their neuron groups.

A model is any ``torch.nn.Module`` together with its *neuron groups* (:class:`Group`). A
group is a set of tensor slices that share one index: ``(state_dict key, axis, block)``
says that neuron ``i`` of the group owns entries ``i*block .. (i+1)*block - 1`` along
``axis`` of that tensor. A conv's output channels form a group with its bias, its
BatchNorm's weight, bias and running statistics, and the input channels of every layer
that reads them (``block`` = positions per channel where a conv's output is flattened into
a linear layer); in a ResNet, the channels of a residual stream (every block's output, the
shortcut projection, the next stage's input, the final norm and classifier input) are one
group; in a transformer, an attention head (``block`` = head dimension on the query, key
and value rows and the projection's columns) or an MLP's hidden unit. A group may declare a
``unit``: neurons that are only kept or dropped together (a GroupNorm group of channels);
masks are drawn in whole units. The input and the classifier's outputs are never in a group.

A mask keeps some neurons of every group. The sub-network of a mask is physically smaller:
:meth:`ModelSpec.module` builds the module with every grouped axis cut to the kept
neurons, and ``submodel.param_index`` gathers its values from the full model (and scatters
its update back) through the same indices. Removing a neuron removes all of its slices, so
the sub-network computes exactly what the full network computes with those neurons taken
out (tests/unit/test_submodel.py checks outputs and gradients for every built-in model).

:class:`ModelSpec` describes a model for the rest of the program: its groups, the flat
layout of its floating-point state (parameters and float buffers, in ``state_dict``
order), and its cost at any widths (multiply-accumulates counted by
``torch.utils.flop_counter`` on the module itself, on the meta device).

Built-in models (:data:`MODELS`): ``lenet``, ``alexnet``, ``cnn-femnist`` (LEAF's FEMNIST
CNN), ``resnet18`` (the pre-activation ResNet-18 of HeteroFL and FedRolex, ``norm`` =
``static-bn``, ``group`` or ``none``) and ``vit-tiny``. A user's model is
``"package.module:factory"``: ``factory(num_classes, in_shape)`` returns ``(module,
groups)`` (see the README).
"""
from __future__ import annotations

import copy
import functools
import importlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("static-bn", "group", "none")
GN_CHANNELS = 16  # channels per GroupNorm group in resnet18 with norm = "group" (kept or dropped whole)


class ModelError(ValueError):
    """A model or its groups cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class Slice:
    tensor: str  # state_dict key (a parameter or a floating-point buffer)
    axis: int
    block: int = 1  # consecutive entries along ``axis`` that belong to one neuron


@dataclass(frozen=True)
class Group:
    name: str
    size: int  # neurons
    slices: tuple
    unit: int = 1  # neurons kept or dropped together (masks are drawn in whole units)

    @property
    def units(self) -> int:
        return self.size // self.unit

    def neurons(self, units) -> np.ndarray:
        """The sorted neuron indices (int32) of the given sorted unit indices."""
        units = np.asarray(units, dtype=np.int64)
        return (units[:, None] * self.unit + np.arange(self.unit)[None, :]).ravel().astype(np.int32)


def group(name: str, size: int, slices, unit: int = 1) -> Group:
    """A :class:`Group` from ``(tensor, axis)`` or ``(tensor, axis, block)`` tuples."""
    return Group(str(name), int(size), tuple(s if isinstance(s, Slice) else Slice(*s) for s in slices), int(unit))


# --------------------------------------------------------------------------- the description
CHECK_BATCH = 2  # images in the model's check (training mode: a BatchNorm needs more than one value a channel)


class ModelSpec:
    """A model for the program: its factory, groups, flat layout and costs (see the module
    docstring). ``factory()`` returns ``(module, groups)``; the module it returns is the
    freshly initialised full model (the torch RNG decides its values)."""

    def __init__(self, name: str, factory, in_shape: tuple, num_classes: int, check: bool = True):
        self.name, self.factory = name, factory
        self.in_shape, self.num_classes = tuple(int(s) for s in in_shape), int(num_classes)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            template, groups = self._call_factory()
            if isinstance(groups, str) and groups == "auto":
                groups = discover_groups(template, self.in_shape, where=f"model {name}")
        self.template = template
        self.groups = tuple(groups)
        state = template.state_dict(keep_vars=True)
        self.entries = []  # (key, full shape, offset) of the flat state, in state_dict order
        offset = 0
        for key, t in state.items():
            if t.is_floating_point():
                self.entries.append((key, tuple(t.shape), offset))
                offset += int(np.prod(t.shape, dtype=np.int64))
        self.flat_size = offset
        self._check_layers(template, state)
        self._check_groups(state)
        self._axes = {}  # key -> [(axis, group name, block)]
        for g in self.groups:
            for s in g.slices:
                self._axes.setdefault(s.tensor, []).append((s.axis % len(state[s.tensor].shape), g.name, s.block))
        if check:  # (a forward pass of a network one unit wide)
            self._check_forward()

    # -- construction -----------------------------------------------------------
    def _call_factory(self):
        try:
            out = self.factory()
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {self.name}: its factory failed: {type(exc).__name__}: {exc}") from None
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)):
            raise ModelError(f"model {self.name}: the factory must return (torch.nn.Module, groups)")
        module, groups = out
        if isinstance(groups, str):
            if groups != "auto":
                raise ModelError(f"model {self.name}: groups must be a list or \"auto\", not {groups!r}")
            return module, groups
        try:
            groups = [g if isinstance(g, Group) else group(**g) if isinstance(g, dict) else group(*g) for g in groups]
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model {self.name}: a group must be models.Group, a dict or (name, size, slices[, unit]): {exc}") from None
        return module, groups

    def _check_layers(self, template: nn.Module, state) -> None:
        """What cutting cannot handle exactly is refused up front, naming the layer."""
        where = f"model {self.name}"
        seen: dict[int, str] = {}
        for key, t in state.items():
            if id(t) in seen:
                raise ModelError(f"{where}: {key} and {seen[id(t)]} are one tied tensor; tied weights are not supported")
            seen[id(t)] = key
        for name, m in template.named_modules():
            if isinstance(m, nn.GroupNorm) and m.weight is None:
                raise ModelError(f"{where}: {name}: a GroupNorm without affine parameters cannot be cut (use affine=True)")
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is None and m.running_mean is None:
                raise ModelError(f"{where}: {name}: a norm layer with neither parameters nor statistics cannot be cut")
        persistent = set(state)
        self._extra = [k for k, _ in template.named_buffers() if k not in persistent or not state[k].is_floating_point()]
        self._norms = {}  # state key of a GroupNorm/LayerNorm weight or bias -> channels per GN group (0: LayerNorm)
        for name, m in template.named_modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                per = m.num_channels // m.num_groups if isinstance(m, nn.GroupNorm) else 0
                for t in ("weight", "bias"):
                    self._norms[f"{name}.{t}" if name else t] = per

    def _check_groups(self, state) -> None:
        where = f"model {self.name}"
        if not self.groups:
            raise ModelError(f"{where} declares no neuron groups (nothing could be masked)")
        seen, owned = set(), {}
        for g in self.groups:
            if not g.name or g.name in seen or "/" in g.name or g.name == "round":
                raise ModelError(f"{where}: group names must be unique, non-empty, without '/' and not 'round': {g.name!r}")
            seen.add(g.name)
            if g.size < 1 or g.unit < 1 or g.size % g.unit:
                raise ModelError(f"{where}: group {g.name}: size {g.size} must be a positive multiple of its unit {g.unit}")
            if not g.slices:
                raise ModelError(f"{where}: group {g.name} has no slices")
            for s in g.slices:
                t = state.get(s.tensor)
                if t is None or not t.is_floating_point():
                    raise ModelError(f"{where}: group {g.name}: {s.tensor!r} is not a floating-point tensor of the module's state_dict")
                if not -t.dim() <= s.axis < t.dim():
                    raise ModelError(f"{where}: group {g.name}: {s.tensor} has no axis {s.axis}")
                axis = s.axis % t.dim()
                if t.shape[axis] != g.size * s.block:
                    raise ModelError(
                        f"{where}: group {g.name}: axis {axis} of {s.tensor} has {t.shape[axis]} entries, "
                        f"not size x block = {g.size} x {s.block}"
                    )
                per = self._norms.get(s.tensor)
                if per == 0:
                    raise ModelError(f"{where}: group {g.name}: {s.tensor} belongs to a LayerNorm, which would normalise "
                                     "over fewer features; a LayerNorm's features cannot be in a group")
                if per and (g.unit * s.block) % per:
                    raise ModelError(f"{where}: group {g.name}: {s.tensor} belongs to a GroupNorm of {per} channels a group; "
                                     f"the group's unit ({g.unit} x block {s.block}) must keep or drop whole GroupNorm groups")
                if (s.tensor, axis) in owned:
                    raise ModelError(f"{where}: axis {axis} of {s.tensor} is in groups {owned[(s.tensor, axis)]} and {g.name}")
                owned[(s.tensor, axis)] = g.name

    def _check_forward(self) -> None:
        """The smallest sub-network (one unit of every group) must run and give one output per
        class: otherwise a layer that reads a group is missing from its slices. Run on the CPU
        in training mode (two samples of zeros: a BatchNorm in training needs more than one
        value a channel; a network one unit wide costs next to nothing), not on the meta device,
        whose first elementwise operation costs torch 1.1 s of imports; on failure, the search
        for the group to name runs on the meta device (no memory)."""
        small = {g.name: g.unit for g in self.groups}
        try:
            out = self._zeros_forward(small)
        except Exception as exc:
            culprit = ""
            try:  # (a full model that fails as well: no group is to blame)
                self._meta_forward({}, batch=CHECK_BATCH)
            except Exception:
                pass
            else:
                for g in self.groups:  # the first group that fails alone (the others full)
                    try:
                        self._meta_forward({g.name: g.unit}, batch=CHECK_BATCH)
                    except Exception:
                        culprit = f"group {g.name}: "
                        break
            raise ModelError(
                f"model {self.name}: {culprit}its sub-networks do not run ({type(exc).__name__}: {_first_line(exc)}); "
                "every tensor axis that reads or writes a group's neurons must be one of that group's slices"
            ) from None
        if tuple(out.shape) != (CHECK_BATCH, self.num_classes):
            raise ModelError(f"model {self.name}: a sub-network's output has shape {tuple(out.shape)}, not ({CHECK_BATCH}, {self.num_classes}): a group cuts the classifier's outputs")

    def module(self, widths: dict[str, int] | None = None, device: str = "cpu") -> nn.Module:
        """The module at ``widths`` (neurons per group; absent: full) with uninitialised
        values (load them with ``submodel.load_flat``)."""
        shapes = self.shapes(widths or {})
        m = copy.deepcopy(self.template)
        for key, t in m.state_dict(keep_vars=True).items():
            shape = shapes.get(key, tuple(t.shape))
            owner_name, _, leaf = key.rpartition(".")
            owner = m.get_submodule(owner_name) if owner_name else m
            new = torch.empty(shape, dtype=t.dtype, device=device)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                owner._buffers[leaf] = new
        _fix_attributes(m)
        if device != "meta":
            # what is still on the meta device (buffers outside the state_dict): made empty on the
            # device here, not by Module.to_empty, whose empty_like of a meta tensor runs torch's
            # Python reference kernels and costs every process 1.1 s of imports (sympy)
            made = {}  # (a tensor shared by two modules stays shared)
            for mod in m.modules():
                for table in (mod._parameters, mod._buffers):
                    for leaf, t in table.items():
                        if t is not None and t.is_meta:
                            if id(t) not in made:  # (the meta tensor is kept with it: its id stays its own)
                                new = torch.empty(tuple(t.shape), dtype=t.dtype, device=device)
                                made[id(t)] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)
                            table[leaf] = made[id(t)][1]
            if self._extra:  # buffers outside the flat state (integer, non-persistent): the factory's values
                with torch.no_grad():
                    for key, value in self._extra_values.items():
                        t = m.get_buffer(key)
                        if t.shape != value.shape:
                            raise ModelError(f"model {self.name}: buffer {key} (outside the state_dict's float entries) "
                                             "changes shape in a sub-network; it cannot be cut")
                        t.copy_(value)
        return m

    @functools.cached_property
    def _extra_values(self) -> dict[str, torch.Tensor]:
        """Buffers outside the flat state (integer, or not in the state_dict) are not trained or
        sent: every rank builds them with the factory under torch seed 0."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = self.init_module()
        return {k: module.get_buffer(k).detach().clone() for k in self._extra}

    def init_module(self) -> nn.Module:
        """A freshly initialised full model (from the torch RNG)."""
        return self._call_factory()[0]

    # -- geometry --------------------------------------------------------------------
    @property
    def maskable(self) -> list[str]:
        return [g.name for g in self.groups]

    def group_of(self, name: str) -> Group:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict:
        return {g.name: g for g in self.groups}

    def full_widths(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def shapes(self, widths: dict[str, int]) -> dict[str, tuple]:
        """Shape of every float state entry at ``widths``."""
        out = {}
        for key, shape, _ in self.entries:
            s = list(shape)
            for axis, gname, block in self._axes.get(key, ()):
                s[axis] = int(widths.get(gname, self._by_name[gname].size)) * block
            out[key] = tuple(s)
        return out

    def num_params(self, widths: dict[str, int] | None = None) -> int:
        """Floats in the flat state at ``widths``."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes(widths or {}).values()))

    def _key(self, widths: dict[str, int] | None) -> tuple:
        widths = widths or {}
        return tuple(int(widths.get(g.name, g.size)) for g in self.groups)

    def _meta_forward(self, widths: dict[str, int], hook=None, batch: int = 1):
        m = self.module(widths, device="meta")
        handles = [mod.register_forward_hook(hook) for mod in m.modules() if not list(mod.children())] if hook else []
        try:
            with torch.no_grad():
                return m(torch.empty((batch, *self.in_shape), device="meta"))
        finally:
            for h in handles:
                h.remove()

    def _zeros_forward(self, widths: dict[str, int]):
        """A forward pass of :data:`CHECK_BATCH` images of zeros through the module at ``widths`` with zero
        values, in training mode (the mode the workers run), leaving torch's random state as
        it was (a dropout draws from it)."""
        with torch.random.fork_rng(devices=[]):
            m = self.module(widths)
            with torch.no_grad():
                for t in m.state_dict(keep_vars=True).values():
                    if t.is_floating_point():
                        t.zero_()
                return m.train()(torch.zeros((CHECK_BATCH, *self.in_shape)))

    @functools.lru_cache(maxsize=4096)
    def _count(self, key: tuple) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        widths = dict(zip(self.maskable, key))
        with FlopCounterMode(display=False) as counter:
            self._meta_forward(widths)
        return int(counter.get_total_flops()) // 2

    def macs(self, widths: dict[str, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass of one sample at ``widths``, as
        ``torch.utils.flop_counter`` counts them on the module (FLOPs / 2)."""
        key = self._key(widths)
        if self._poly is not None:
            return self._poly(key)
        return self._count(key)

    def macs_share(self, widths: dict[str, int] | None = None) -> float:
        """``macs(widths) / macs()``; the full model's is 1 without counting (counting runs a
        forward pass on the meta device, whose first costs torch 1.1 s of imports)."""
        key = self._key(widths)
        if key == self._key(None):
            return 1.0
        return self.macs(widths) / self.macs()

    @functools.cached_property
    def _poly(self):
        """The MACs as an exact polynomial in the group widths, fitted to counts at seeded
        random widths and checked exactly at others; ``None`` when the model's costs are not of
        that form (each width is then counted directly). A conv or linear layer costs in-width x
        out-width, attention one width: the terms are 1, every width, and the product of two
        widths that share a tensor (or, failing that, every product)."""
        sizes = np.asarray([g.size for g in self.groups], dtype=np.int64)
        n = sizes.size
        index = {g.name: i for i, g in enumerate(self.groups)}
        fixed = [i for i, g in enumerate(self.groups) if g.units == 1]  # (one unit: always whole, a constant)
        shared = set()
        for axes in self._axes.values():  # groups on two axes of one tensor (a group twice: its square)
            on = [index[g] for _, g, _ in axes]
            shared |= {tuple(sorted((on[x], on[y]))) for x in range(len(on)) for y in range(x + 1, len(on))}
        shared = sorted(p for p in shared if p[0] not in fixed and p[1] not in fixed)
        every = [(i, j) for i in range(n) for j in range(i, n) if i not in fixed and j not in fixed]
        free = [i for i in range(n) if i not in fixed]
        rng = np.random.default_rng(0)

        units = np.asarray([g.unit for g in self.groups], dtype=np.int64)

        def draw(k):  # (whole units: a GroupNorm group is never cut)
            return [tuple(int(x) for x in rng.integers(1, sizes // units + 1) * units) for _ in range(k)]

        for pairs in (shared, every):
            def features(w, pairs=pairs):
                w = np.asarray(w, dtype=np.float64)
                return np.concatenate([[1.0], w[free], [w[i] * w[j] for i, j in pairs]])

            terms = 1 + len(free) + len(pairs)
            points = [tuple(int(x) for x in sizes)] + draw(terms + 8)
            a = np.stack([features(p) for p in points])
            b = np.asarray([self._count(p) for p in points], dtype=np.float64)
            coef = np.rint(np.linalg.lstsq(a, b, rcond=None)[0]).astype(np.int64)

            def poly(w, coef=coef, pairs=pairs) -> int:
                w = [int(x) for x in w]
                total = int(coef[0]) + sum(int(c) * w[i] for c, i in zip(coef[1 : 1 + len(free)], free))
                return total + sum(int(c) * w[i] * w[j] for c, (i, j) in zip(coef[1 + len(free) :], pairs))

            if all(poly(p) == self._count(p) for p in points + draw(6)):
                return poly
        return None

    @functools.lru_cache(maxsize=256)
    def _activations(self, key: tuple) -> int:
        total = [int(np.prod(self.in_shape))]

        def hook(_m, _inp, out):
            if isinstance(out, torch.Tensor):
                total[0] += int(out.numel())

        self._meta_forward(dict(zip(self.maskable, key)), hook)
        return total[0]

    def activation_floats(self, widths: dict[str, int] | None = None) -> int:
        """Outputs of every leaf module for one sample (a memory estimate of what the backward
        pass keeps)."""
        return self._activations(self._key(widths))

    def __repr__(self) -> str:
        return f"ModelSpec({self.name!r}, groups={[g.name for g in self.groups]})"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0] or type(exc).__name__


def _fix_attributes(m: nn.Module) -> None:
    """Bring the size attributes of standard layers in line with their (cut) tensors."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            if mod.groups > 1 and mod.groups == mod.out_channels and mod.weight.shape[1] == 1:
                mod.groups = mod.weight.shape[0]  # depthwise (its attributes are still the full model's here)
            mod.out_channels = mod.weight.shape[0]
            mod.in_channels = mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            t = mod.weight if mod.weight is not None else mod.running_mean
            if t is not None:
                mod.num_features = t.shape[0]
        elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
            per = mod.num_channels // mod.num_groups
            mod.num_channels = mod.weight.shape[0]
            mod.num_groups = max(1, mod.num_channels // per)
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)


# --------------------------------------------------------------------------- discovery
def discover_groups(module: nn.Module, in_shape: tuple, where: str = "the model") -> list[Group]:
    """Neuron groups found in the module's traced graph by torch-pruning's dependency graph
    (``torch_pruning.DependencyGraph``: which layers' channels must be cut together through
    residual adds, norms, pooling and flattening), turned into slices. Handles conv (not
    grouped), linear, BatchNorm and GroupNorm layers; the classifier's outputs (the layer that
    returns the model's output) are left out. Anything else in a group (a LayerNorm, an
    attention layer, a concatenation, a custom layer with parameters) is refused with its name:
    declare such a model's groups by hand."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ModelError(f"{where}: automatic group discovery needs torch-pruning (pip install torch-pruning)") from None
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    example = torch.zeros((1, *in_shape), device=device)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.__setitem__(id(o), m))
             for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            y = module(example)
    except Exception as exc:
        raise ModelError(f"{where}: the model does not run on an input of shape {tuple(example.shape)} "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        for h in hooks:
            h.remove()
    head = outputs.get(id(y))
    if head is None:
        raise ModelError(f"{where}: the model's output is not a layer's output (cannot tell the classifier); declare its groups by hand")
    names = {m: n for n, m in module.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    with warnings.catch_warnings():  # (its note on parameters outside layers: the forward check below catches those)
        warnings.simplefilter("ignore")
        try:
            graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
        except Exception as exc:
            raise ModelError(f"{where}: torch-pruning could not trace the model ({type(exc).__name__}: {_first_line(exc)}); "
                             "declare the groups by hand") from None
    found = []
    for g in graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        deps = [(dep, idxs) for dep, idxs in g]
        root = deps[0][0]
        if any(dep.target.module is head and "out" in dep.handler.__name__ for dep, _ in deps):
            continue  # the classifier's outputs
        size = len(deps[0][1])
        one = [(dep, idxs) for dep, idxs in graph.get_pruning_group(root.target.module, root.handler, idxs=[1] if size > 1 else [0])]
        slices, unit = [], 1
        for dep, idxs in one:
            m, handler = dep.target.module, dep.handler.__name__
            name = names.get(m)
            block = len(idxs)
            if size > 1 and sorted(idxs) != list(range(block, 2 * block)):
                raise ModelError(f"{where}: {dep.target.name}: channels map with an offset (a concatenation or split?); declare the groups by hand")
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
                    raise ModelError(f"{where}: {name}: grouped or depthwise convolutions are not discovered; declare the groups by hand")
                if "out" in handler:
                    slices += [(f"{name}.weight", 0)] + ([(f"{name}.bias", 0)] if m.bias is not None else [])
                else:
                    slices.append((f"{name}.weight", 1, block))
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                slices += [(f"{name}.{k}", 0) for k, t in m.state_dict(keep_vars=True).items() if t.is_floating_point()]
                if isinstance(m, nn.GroupNorm):
                    unit = max(unit, m.num_channels // m.num_groups)
            elif isinstance(m, nn.LayerNorm):
                raise ModelError(f"{where}: {name}: a LayerNorm would normalise over fewer features; declare the groups by hand (as vit-tiny does)")
            elif isinstance(m, nn.Module) and name is not None and any(True for _ in m.parameters(recurse=False)):
                raise ModelError(f"{where}: {name} ({type(m).__name__}) is not a layer discovery knows; declare the groups by hand")
            elif type(m).__name__ in ("_ConcatOp", "_SplitOp", "_UnbindOp"):
                raise ModelError(f"{where}: {dep.target.name}: concatenation and split are not discovered; declare the groups by hand")
        slices = list(dict.fromkeys(slices))  # (a norm layer may be reached twice)
        gname = root.target.name.split(" ")[0]
        found.append((order.get(names.get(root.target.module), 0), group(gname, size, slices, unit)))
    if not found:
        raise ModelError(f"{where}: no groups of neurons were found; declare them by hand")
    return [g for _, g in sorted(found, key=lambda t: t[0])]


# --------------------------------------------------------------------------- conv/fc chains
class Chain(nn.Module):
    """Conv and FC layers in a chain (ReLU after each but the last; max-pool where given;
    flattened into the first FC layer). ``layers``: (name, kind, out, kernel, padding, pool)."""

    def __init__(self, in_shape: tuple, layers: tuple):
        super().__init__()
        self.layers = layers
        c, h, w = in_shape
        prev, flat = c, h * w  # (an fc first layer reads the flattened image)
        for name, kind, out, kernel, padding, pool in layers:
            if kind == "conv":
                self.add_module(name, nn.Conv2d(prev, out, kernel, padding=padding))
                h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
                if pool:
                    h, w = h // pool, w // pool
                if h < 1 or w < 1:
                    raise ModelError(f"the model does not fit input images of shape {tuple(in_shape)}")
                flat = h * w
            else:
                self.add_module(name, nn.Linear(prev * flat, out))
                flat = 1
            prev = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, (name, kind, _out, _k, _p, pool) in enumerate(self.layers):
            if kind == "fc" and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = getattr(self, name)(x)
            if i == last:
                break
            x = F.relu(x)
            if kind == "conv" and pool:
                x = max_pool(x, pool)
        return x


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k)`` (k x k windows, stride k, no padding). Without autograd (the
    evaluation) as the elementwise maximum of the k*k strided views, which selects the same
    values and is 4-6x faster on CPU than max_pool2d, whose kernel computes the indices that
    only its backward pass needs; with autograd, max_pool2d itself, whose backward pass
    sends a tie's gradient to the first maximum of the window (the maximum's splits it)."""
    h, w = x.shape[2] // k * k, x.shape[3] // k * k
    if torch.is_grad_enabled() or x.dim() != 4 or not x.is_contiguous() or h == 0 or w == 0:
        return F.max_pool2d(x, k)  # (also for channels-last input, where ties of -0.0 and 0.0 could differ)
    out = x[:, :, 0:h:k, 0:w:k].clone()
    for i in range(k):
        for j in range(k):
            if i or j:
                torch.maximum(out, x[:, :, i:h:k, j:w:k], out=out)
    return out


def chain_groups(in_shape: tuple, layers: tuple) -> list[Group]:
    """One group per layer but the last: its output neurons and the next layer's inputs."""
    c, h, w = in_shape
    groups = []
    for i, (name, kind, out, kernel, padding, pool) in enumerate(layers[:-1]):
        block = 1
        if kind == "conv":
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if pool:
                h, w = h // pool, w // pool
            if layers[i + 1][1] == "fc":
                block = h * w
        nxt = layers[i + 1][0]
        groups.append(group(name, out, [(f"{name}.weight", 0), (f"{name}.bias", 0), (f"{nxt}.weight", 1, block)]))
    return groups


def make_lenet(num_classes: int = 10, in_shape: tuple = (1, 28, 28)):
    """LeNet-style CNN for 28x28 grey images (the Caffe LeNet widths: 20, 50, 500)."""
    layers = (("conv1", "conv", 20, 5, 0, 2), ("conv2", "conv", 50, 5, 0, 2), ("fc1", "fc", 500, 0, 0, 0), ("fc2", "fc", num_classes, 0, 0, 0))
    return Chain(in_shape, layers), chain_groups(in_shape, layers)


def make_alexnet(num_classes: int = 10, in_shape: tuple = (3, 32, 32)):
    """AlexNet-style CNN for 32x32 RGB images (CIFAR-10): two 5x5 convs, three FC layers."""
    layers = (("conv1", "conv", 64, 5, 2, 2), ("conv2", "conv", 64, 5, 2, 2), ("fc1", "fc", 384, 0, 0, 0),
              ("fc2", "fc", 192, 0, 0, 0), ("fc3", "fc", num_classes, 0, 0, 0))
    return Chain(in_shape, layers), chain_groups(in_shape, layers)


def make_cnn_femnist(num_classes: int = 62, in_shape: tuple = (1, 28, 28)):
    """LEAF's FEMNIST CNN: 5x5 convs of 32 and 64 channels ('same' padding, 2x2 max-pool
    after each), a 2048-unit hidden layer, the classifier."""
    layers = (("conv1", "conv", 32, 5, 2, 2), ("conv2", "conv", 64, 5, 2, 2), ("fc1", "fc", 2048, 0, 0, 0),
              ("fc2", "fc", num_classes, 0, 0, 0))
    return Chain(in_shape, layers), chain_groups(in_shape, layers)


# --------------------------------------------------------------------------- ResNet-18
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "static-bn":  # HeteroFL's sBN: no running statistics; batch statistics always
        return nn.BatchNorm2d(channels, momentum=None, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // GN_CHANNELS), channels)
    return nn.Identity()


class PreActBlock(nn.Module):
    """HeteroFL/FedRolex's pre-activation basic block: the shortcut projection (where the
    shape changes) reads relu(n1(x)), like the first conv."""

    def __init__(self, cin: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.n1 = _norm(norm, cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.n2 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.n1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.n2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, hidden=(64, 128, 256, 512), blocks=(2, 2, 2, 2), norm="static-bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden[0], 3, 1, 1, bias=False)
        cin = hidden[0]
        for s, (planes, n) in enumerate(zip(hidden, blocks)):
            stage = nn.Sequential(*[PreActBlock(cin if b == 0 else planes, planes, (1 if s == 0 else 2) if b == 0 else 1, norm) for b in range(n)])
            self.add_module(f"layer{s + 1}", stage)
            cin = planes
        self.n4 = _norm(norm, cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.relu(self.n4(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _norm_slices(module: nn.Module, prefix: str) -> list[tuple]:
    return [(f"{prefix}.{k}", 0) for k, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()]


def resnet18_groups(model: PreActResNet, unit: int) -> list[Group]:
    """Per stage one group for its residual stream; per block one for its inner channels."""
    stages = [getattr(model, f"layer{s + 1}") for s in range(4)]
    streams = [[("conv1.weight", 0)]] + [[] for _ in range(3)]
    groups = []
    for s, stage in enumerate(stages):
        for b, block in enumerate(stage):
            p = f"layer{s + 1}.{b}"
            src = s if b > 0 or s == 0 else s - 1  # the stream this block reads
            streams[src] += _norm_slices(block.n1, f"{p}.n1") + [(f"{p}.conv1.weight", 1)]
            if hasattr(block, "shortcut"):
                streams[src].append((f"{p}.shortcut.weight", 1))
                streams[s].append((f"{p}.shortcut.weight", 0))
            streams[s].append((f"{p}.conv2.weight", 0))
            planes = block.conv1.weight.shape[0]
            inner = [(f"{p}.conv1.weight", 0)] + _norm_slices(block.n2, f"{p}.n2") + [(f"{p}.conv2.weight", 1)]
            groups.append(group(f"{p}.inner", planes, inner, unit))
    streams[3] += _norm_slices(model.n4, "n4") + [("linear.weight", 1)]
    sizes = [stage[0].conv2.weight.shape[0] for stage in stages]
    return [group(f"layer{s + 1}.stream", sizes[s], streams[s], unit) for s in range(4)] + groups


def make_resnet18(num_classes: int = 10, in_shape: tuple = (3, 32, 32), norm: str = "static-bn"):
    """The pre-activation ResNet-18 of HeteroFL and FedRolex for 32x32 inputs (3x3 stem, no
    max-pool; stages of 64, 128, 256, 512 channels, two blocks each), with ``norm``:
    ``static-bn`` (BatchNorm without running statistics), ``group`` (GroupNorm of
    :data:`GN_CHANNELS` channels a group, kept or dropped whole) or ``none``."""
    if norm not in NORMS:
        raise ModelError(f"unknown model.norm {norm!r}; choose one of: {', '.join(NORMS)}")
    model = PreActResNet(num_classes, in_shape[0], norm=norm)
    return model, resnet18_groups(model, GN_CHANNELS if norm == "group" else 1)


# --------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention with separate query, key and value projections, so that a
    head is a contiguous block of ``head_dim`` rows (the number of heads follows the weights)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        heads = self.q.weight.shape[0] // self.head_dim

        def split(z):
            return z.view(b, t, heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, num_classes: int, in_shape: tuple, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128):
        super().__init__()
        c, h, w = in_shape
        if h % patch or w % patch:
            raise ModelError(f"vit-tiny needs image sides divisible by its patch size {patch}, got {tuple(in_shape)}")
        self.embed = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        shape = (1, (h // patch) * (w // patch) + 1, dim)
        # (described on the meta device, the values do not matter, and arithmetic there would
        # cost torch 1.1 s of imports: an empty tensor)
        self.pos = nn.Parameter(torch.empty(shape) if torch.empty(0).is_meta else torch.randn(shape) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, dim // heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def make_vit_tiny(num_classes: int = 10, in_shape: tuple = (1, 28, 28)):
    """A small vision transformer for 28x28 or 32x32 images: 4x4 patches, width 64, four
    encoder blocks of 4 heads (16 dimensions each) and a 128-unit MLP, a class token. Groups:
    each block's attention heads (whole heads) and MLP hidden units; the residual width (64)
    is never cut (LayerNorm would normalise over fewer features)."""
    model = ViT(num_classes, in_shape)
    groups = []
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        hd = blk.attn.head_dim
        heads = blk.attn.q.weight.shape[0] // hd
        sl = [(f"{p}.attn.{n}.{t}", 0, hd) for n in "qkv" for t in ("weight", "bias")] + [(f"{p}.attn.proj.weight", 1, hd)]
        groups.append(group(f"{p}.heads", heads, sl))
        groups.append(group(f"{p}.mlp", blk.fc1.weight.shape[0], [(f"{p}.fc1.weight", 0), (f"{p}.fc1.bias", 0), (f"{p}.fc2.weight", 1)]))
    return model, groups


MODELS = {"lenet": make_lenet, "alexnet": make_alexnet, "cnn-femnist": make_cnn_femnist, "resnet18": make_resnet18, "vit-tiny": make_vit_tiny}


def _load_factory(name: str):
    module_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"model {name}: cannot import {module_name} ({type(exc).__name__}: {exc}); is it on PYTHONPATH on every node?") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelError(f"model {name}: {module_name} has no callable {attr!r}")
    return factory


def get_spec(name: str, num_classes: int, in_shape: tuple, norm: str = "static-bn", check: bool = True) -> ModelSpec:
    """The :class:`ModelSpec` of a built-in model or of ``"package.module:factory"`` (one object
    per distinct argument list: its costs are counted once). ``check=False`` skips the forward
    pass that proves the groups' slices complete, for a process whose model another has
    checked already (a worker rank: rank 0 refused a bad model before the job started)."""
    return _spec(str(name), int(num_classes), tuple(int(s) for s in in_shape), str(norm), bool(check))


@functools.lru_cache(maxsize=64)
def _spec(name: str, num_classes: int, in_shape: tuple, norm: str, check: bool = True) -> ModelSpec:
    if ":" in name:
        factory = _load_factory(name)
    elif name in MODELS:
        factory = MODELS[name]
    else:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or package.module:factory")
    if name == "resnet18":
        if norm not in NORMS:
            raise ModelError(f"unknown model.norm {norm!r}; choose one of: {', '.join(NORMS)}")
        return ModelSpec(name, functools.partial(factory, num_classes, in_shape, norm), in_shape, num_classes, check)
    return ModelSpec(name, functools.partial(factory, num_classes, in_shape), in_shape, num_classes, check)


def spec_of(model: object, num_classes: int, in_shape: tuple, check: bool = True) -> ModelSpec:
    """The spec of a run's ``[model]`` section: a ``config.ModelConfig`` or the dict a
    checkpoint stores (``norm`` absent in files written before it existed: static-bn)."""
    if isinstance(model, dict):
        name, norm = str(model.get("name", "lenet")), str(model.get("norm", "static-bn"))
    else:
        name, norm = model.name, model.norm
    return get_spec(name, num_classes, in_shape, norm=norm, check=check)


def lenet(num_classes: int = 10, in_shape: tuple = (1, 28, 28)) -> ModelSpec:
    return get_spec("lenet", num_classes, in_shape)


def alexnet(num_classes: int = 10, in_shape: tuple = (3, 32, 32)) -> ModelSpec:
    return get_spec("alexnet", num_classes, in_shape)
