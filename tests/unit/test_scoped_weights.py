"""asuka_core.scoped_weights: gradients through an inference-mode model, leaving it as it was."""

from __future__ import annotations

import pytest
import torch

from asuka_core.scoped_weights import differentiable_weights


def _model():
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        net.eval()
    return net


def _snapshot(net):
    return [(name, t, t.requires_grad, t.is_inference(), t.detach().clone())
            for name, t in list(net.named_parameters()) + list(net.named_buffers())]


def test_backward_works_inside_and_the_module_is_unchanged_after():
    net = _model()
    before = _snapshot(net)
    x = torch.randn(5, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
        with torch.enable_grad():
            net(x.clone().requires_grad_(True)).sum().backward()
    with torch.enable_grad(), differentiable_weights(net) as replaced:
        assert replaced == len(before)
        xg = x.clone().requires_grad_(True)
        net(xg).sum().backward()
        assert all(not p.requires_grad and p.grad is None for p in net.parameters())
    # oracle: the same maths with plain tensors
    w0, b0 = before[0][4], before[1][4]
    w2, b2 = before[4][4], before[5][4]
    bn = net[1]
    xr = x.clone().requires_grad_(True)
    h = (xr @ w0.T + b0 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight.detach().clone() \
        + bn.bias.detach().clone()
    (h @ w2.T + b2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    after = _snapshot(net)
    for (name, t, rg, inf, value), (name2, t2, rg2, inf2, value2) in zip(before, after):
        assert name == name2 and t is t2 and rg == rg2 and inf == inf2 and torch.equal(value, value2), name


def test_restored_on_error_and_tied_tensors_get_one_copy():
    with torch.inference_mode():
        a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        b.weight = a.weight
        net = torch.nn.Sequential(a, b)
    originals = [p for p in net.parameters()]
    with pytest.raises(KeyboardInterrupt):
        with differentiable_weights(net):
            assert net[0].weight is net[1].weight and not net[0].weight.is_inference()
            raise KeyboardInterrupt
    assert [p for p in net.parameters()] == originals and net[1].weight is originals[0]


def test_only_tensors_on_the_given_device_and_only_inference_ones():
    with torch.inference_mode():
        net = torch.nn.Linear(2, 2)
    plain = torch.nn.Linear(2, 2)
    plain.bias.requires_grad_(False)
    with differentiable_weights(net, device=torch.device("meta")) as n:
        assert n == 0 and net.weight.is_inference()
    with differentiable_weights(plain) as n:
        assert n == 0
        assert not plain.weight.requires_grad                   # frozen for the block ...
        x = torch.randn(3, 2, requires_grad=True)
        plain(x).sum().backward()
        assert plain.weight.grad is None and x.grad is not None
    assert plain.weight.requires_grad and not plain.bias.requires_grad     # ... and given back its flags

