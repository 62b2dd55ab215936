"""The workers' SGD (optim.py) is torch.optim.SGD bit for bit, and a training process never
imports torch._dynamo (1.1 s of CPU a process at start-up)."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from elfish_mpi.models import get_spec
from elfish_mpi.optim import SGD


def _train(spec, make_opt, steps=5, frozen=None):
    torch.manual_seed(0)
    model = spec.init_module()
    if frozen:  # a parameter outside training: no gradient, never moved
        model.get_parameter(frozen).requires_grad_(False)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, *spec.in_shape, generator=g)
        y = torch.randint(0, spec.num_classes, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("name,shape", [("lenet", (1, 28, 28)), ("resnet18", (3, 32, 32))])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_is_torch_sgd_bit_for_bit(name, shape, momentum):
    spec = get_spec(name, 10, shape)
    ours = _train(spec, lambda p: SGD(p, lr=0.05, momentum=momentum))
    ref = _train(spec, lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    start = _train(spec, lambda p: SGD(p, lr=0.05, momentum=momentum), steps=0)
    assert any(not torch.equal(start[k], ours[k]) for k in ref)  # (it did train)


def test_sgd_skips_what_has_no_gradient():
    spec = get_spec("lenet", 10, (1, 28, 28))
    name = next(iter(spec.init_module().state_dict()))
    ours = _train(spec, lambda p: SGD(p, lr=0.05, momentum=0.5), frozen=name)
    ref = _train(spec, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5), frozen=name)
    start = _train(spec, lambda p: SGD(p, lr=0.05), steps=0)
    assert torch.equal(ours[name], start[name])
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _late(make_opt, set_to_none: bool):
    """Two layers; the loss reaches the second only from the third step on (its momentum
    buffer starts then), and the first is frozen at the start and trained from step 4."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
    a.weight.requires_grad_(False)
    opt = make_opt([*a.parameters(), *b.parameters()])
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        if step == 4:
            a.weight.requires_grad_(True)
        x = torch.randn(5, 6, generator=g)
        h = a(x)
        loss = (b(h).square().mean() if step >= 2 else 0.0) + h.square().mean()
        opt.zero_grad(set_to_none=set_to_none)
        loss.backward()
        opt.step()
    return [t.detach().clone() for t in (a.weight, a.bias, b.weight, b.bias)]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_sgd_follows_gradients_that_start_late(set_to_none):
    ours = _late(lambda p: SGD(p, lr=0.1, momentum=0.9), set_to_none)
    ref = _late(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), set_to_none)
    assert all(torch.equal(x, y) for x, y in zip(ours, ref))
    torch.manual_seed(0)
    a0 = torch.nn.Linear(6, 6)
    assert not torch.equal(ours[0], a0.weight)  # (the weight unfrozen later did train)


def test_sgd_refuses_bad_settings():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        SGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(p, lr=0.1, momentum=float("nan"))


def test_a_training_process_never_imports_dynamo():
    """What a FedAvg worker and rank 0 do with every built-in model (the model's check, the
    full model, steps with momentum, its evaluation, the MACs share of the full model) leaves
    torch._dynamo and sympy unimported."""
    code = """
import sys, torch
import torch.nn.functional as F
from elfish_mpi.models import get_spec
from elfish_mpi.masking import compute_ratio
from elfish_mpi.optim import SGD
from elfish_mpi.submodel import full_model, build_submodel, flat_params
from elfish_mpi import evaluation
from elfish_mpi.models import MODELS
shapes = {"alexnet": (3, 32, 32), "resnet18": (3, 32, 32), "vit-tiny": (3, 32, 32)}
for name, norm in [(n, "static-bn") for n in MODELS] + [("resnet18", "group"), ("resnet18", "none")]:
    shape = shapes.get(name, (1, 28, 28))
    spec = get_spec(name, 10, shape, norm=norm)  # (with the model's check)
    flat = flat_params(spec.init_module())
    model, idx = build_submodel(spec, {g.name: list(range(g.size)) for g in spec.groups}, flat)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(torch.zeros(4, *shape)), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
    evaluation.evaluate(full_model(spec), torch.zeros(3, *shape), torch.zeros(3, dtype=torch.long))
    assert compute_ratio(spec, {g.name: list(range(g.size)) for g in spec.groups}) == 1.0
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
