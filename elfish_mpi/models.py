"""Maskable CNNs.

A model is described by a :class:`ModelSpec`: a chain of conv and fully connected layers.
Every layer except the last (the classifier) holds maskable *neurons*: the output channels
of a conv layer, the output units of a hidden FC layer. The input is never masked.

:class:`MaskableCNN` builds the network for any per-layer width, so the same class gives
the full model and every physically smaller sub-network. Parameter names are
``<layer>.weight`` / ``<layer>.bias`` and the neurons of ``<layer>`` lie on the first
axis of ``<layer>.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # "conv" or "fc"
    out: int
    kernel: int = 0
    padding: int = 0
    pool: int = 0  # max-pool size (and stride) after the activation; 0: none
    maskable: bool = True


@dataclass(frozen=True)
class ModelSpec:
    name: str
    in_shape: tuple  # (channels, height, width)
    layers: tuple

    # -- geometry -----------------------------------------------------------
    def feature_shapes(self) -> list[tuple]:
        """Output shape (C, H, W) of every conv layer after pooling; (units,) for fc layers."""
        c, h, w = self.in_shape
        shapes = []
        for layer in self.layers:
            if layer.kind == "conv":
                h = h + 2 * layer.padding - layer.kernel + 1
                w = w + 2 * layer.padding - layer.kernel + 1
                if layer.pool:
                    h, w = h // layer.pool, w // layer.pool
                shapes.append((layer.out, h, w))
            else:
                shapes.append((layer.out,))
        return shapes

    def input_spatial(self, index: int) -> int:
        """Positions per input channel of layer ``index`` (H*W after a conv, 1 otherwise)."""
        if index == 0:
            return self.in_shape[1] * self.in_shape[2] if self.layers[0].kind == "fc" else 1
        prev = self.feature_shapes()[index - 1]
        if self.layers[index].kind == "fc" and len(prev) == 3:
            return prev[1] * prev[2]
        return 1

    @property
    def maskable(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.maskable]

    def full_widths(self) -> dict[str, int]:
        return {layer.name: layer.out for layer in self.layers}

    def macs(self, widths: dict[str, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass of one sample at the given widths."""
        widths = widths or {}
        c_in, h, w = self.in_shape
        prev_units = c_in
        total = 0
        for i, layer in enumerate(self.layers):
            out = widths.get(layer.name, layer.out)
            if layer.kind == "conv":
                h = h + 2 * layer.padding - layer.kernel + 1
                w = w + 2 * layer.padding - layer.kernel + 1
                total += out * prev_units * layer.kernel * layer.kernel * h * w
                if layer.pool:
                    h, w = h // layer.pool, w // layer.pool
                prev_units = out
            else:
                spatial = self.input_spatial(i)
                total += out * prev_units * spatial
                prev_units = out
        return total

    def num_params(self, widths: dict[str, int] | None = None) -> int:
        widths = widths or {}
        prev = self.in_shape[0]
        total = 0
        for i, layer in enumerate(self.layers):
            out = widths.get(layer.name, layer.out)
            fan_in = prev * (layer.kernel * layer.kernel if layer.kind == "conv" else self.input_spatial(i))
            total += out * fan_in + out
            prev = out
        return total

    def activation_floats(self, widths: dict[str, int] | None = None) -> int:
        """Activations of one sample kept for the backward pass (a memory estimate)."""
        widths = widths or {}
        c, h, w = self.in_shape
        total = c * h * w
        for layer in self.layers:
            out = widths.get(layer.name, layer.out)
            if layer.kind == "conv":
                h = h + 2 * layer.padding - layer.kernel + 1
                w = w + 2 * layer.padding - layer.kernel + 1
                total += 2 * out * h * w
                if layer.pool:
                    h, w = h // layer.pool, w // layer.pool
                    total += out * h * w
            else:
                total += 2 * out
        return total


def lenet(num_classes: int = 10, in_shape: tuple = (1, 28, 28)) -> ModelSpec:
    """LeNet-style CNN for 28x28 grey images (the Caffe LeNet widths: 20, 50, 500)."""
    return ModelSpec(
        "lenet",
        in_shape,
        (
            Layer("conv1", "conv", 20, kernel=5, pool=2),
            Layer("conv2", "conv", 50, kernel=5, pool=2),
            Layer("fc1", "fc", 500),
            Layer("fc2", "fc", num_classes, maskable=False),
        ),
    )


def alexnet(num_classes: int = 10, in_shape: tuple = (3, 32, 32)) -> ModelSpec:
    """AlexNet-style CNN for 32x32 RGB images (CIFAR-10): two 5x5 convs, three FC layers."""
    return ModelSpec(
        "alexnet",
        in_shape,
        (
            Layer("conv1", "conv", 64, kernel=5, padding=2, pool=2),
            Layer("conv2", "conv", 64, kernel=5, padding=2, pool=2),
            Layer("fc1", "fc", 384),
            Layer("fc2", "fc", 192),
            Layer("fc3", "fc", num_classes, maskable=False),
        ),
    )


MODELS = {"lenet": lenet, "alexnet": alexnet}


def get_spec(name: str, num_classes: int, in_shape: tuple) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    spec = MODELS[name](num_classes=num_classes, in_shape=tuple(in_shape))
    for shape in spec.feature_shapes():
        if len(shape) == 3 and (shape[1] < 1 or shape[2] < 1):
            raise ValueError(f"model {name} does not fit input images of shape {tuple(in_shape)}")
    return spec


class MaskableCNN(nn.Module):
    """The network of ``spec`` at the given widths (default: full)."""

    def __init__(self, spec: ModelSpec, widths: dict[str, int] | None = None):
        super().__init__()
        self.spec = spec
        widths = dict(spec.full_widths(), **(widths or {}))
        self.widths = widths
        prev = spec.in_shape[0]
        for i, layer in enumerate(spec.layers):
            out = widths[layer.name]
            if layer.kind == "conv":
                module = nn.Conv2d(prev, out, layer.kernel, padding=layer.padding)
            else:
                module = nn.Linear(prev * spec.input_spatial(i), out)
            self.add_module(layer.name, module)
            prev = out

    def forward(self, x: torch.Tensor, neuron_masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``neuron_masks`` (layer -> 0/1 float vector) zeroes neurons' outputs: the reference
        semantics that a sub-network must reproduce exactly (used by tests, never in training)."""
        last = len(self.spec.layers) - 1
        for i, layer in enumerate(self.spec.layers):
            module = getattr(self, layer.name)
            if layer.kind == "fc" and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = module(x)
            if i == last:
                break
            x = F.relu(x)
            if layer.kind == "conv" and layer.pool:
                x = F.max_pool2d(x, layer.pool)
            if neuron_masks is not None and layer.name in neuron_masks:
                m = neuron_masks[layer.name]
                x = x * (m.view(1, -1, 1, 1) if x.dim() == 4 else m.view(1, -1))
        return x
