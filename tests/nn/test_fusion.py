"""``fastmeta.nn.fuse_conv_blocks``: a model whose ``BatchNorm2d, ReLU, MaxPool2d(2)`` runs go through
the fused ``bn_relu_pool`` op, sharing everything with the original, which is never modified.

Where a run cannot be fused (eval-mode running statistics, ``vmap``, hooks, compiling, other
dtypes or devices) the original modules run; running statistics are updated as ``BatchNorm2d``
updates them. The speed mode ``MetaLearner(fused=True)`` is compared with an independent per-task
MAML loop (Finn et al. 2017, eq. 1 inner step; the meta-gradient of their Algorithm 1; Fallah eq. 5).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta import _extension
from fastmeta.models import Conv4, SineMLP
from fastmeta.nn import FusedSequential, count_fusable, fuse_conv_blocks, fusion
from reference import rel_err
from test_speed_modes import conv_batch, oracle

if not _extension.available():
    pytest.skip(f"native extension unavailable: {_extension.reason()}", allow_module_level=True)


@pytest.fixture
def fused_calls(monkeypatch):
    """The input shapes of every fused run (bn_relu_pool call made by a FusedSequential)."""
    calls = []
    original = fusion.bn_relu_pool

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(fusion, "bn_relu_pool", counting)
    return calls


def block(c_in=1, c=4, pool=2, **bn):
    return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c, **bn), nn.ReLU(), nn.MaxPool2d(pool))


def test_finds_conv4_blocks_and_leaves_the_model_alone(fused_calls):
    torch.manual_seed(0)
    model = Conv4(5, hidden=8).double()
    assert count_fusable(model) == 4
    keys = list(model.state_dict())
    children = dict(model.named_modules())
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    fused = fuse_conv_blocks(model)
    got = fused(x)
    assert len(fused_calls) == 4 and count_fusable(fused) == 4
    assert fused is not model and type(fused) is Conv4 and isinstance(fused.features, FusedSequential)
    assert type(model.features) is nn.Sequential and "forward" not in model.features.__dict__
    assert dict(model.named_modules()) == children and list(model.state_dict()) == keys
    torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)
    assert len(fused_calls) == 4  # the model itself runs unfused


def test_skips_what_it_cannot_fuse(fused_calls):
    # MaxPool2d(3), BatchNorm in eval mode with running statistics, a functorch transform, hooks.
    seq = block(pool=3)
    assert count_fusable(seq) == 0 and fuse_conv_blocks(seq) is seq
    model = block().double()
    fused = fuse_conv_blocks(model)
    assert count_fusable(model) == 1 and isinstance(fused, FusedSequential)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model.train()
    model(x)  # running statistics move off their initial values
    model.eval()
    got = fused(x)
    torch.testing.assert_close(got, model(x))
    got = torch.func.vmap(fused)(x.unsqueeze(1))
    torch.testing.assert_close(got, torch.func.vmap(model)(x.unsqueeze(1)))
    assert fused_calls == []
    model.train()
    # a hook on one of the three modules must still run: that run is not fused
    seen = []
    handle = model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused(x)
    assert seen == [torch.Size([3, 4, 8, 8])] and fused_calls == []
    handle.remove()
    fused(x)
    assert fused_calls == [(3, 4, 8, 8)]


def test_vmap_with_batch_statistics_falls_back(fused_calls):
    # Batch statistics (nothing else stops fusion): only the functorch transform makes it fall back.
    model = block(track_running_stats=False).double()
    fused = fuse_conv_blocks(model)
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(fused)(x), torch.func.vmap(model)(x), rtol=1e-12, atol=1e-12)
    assert fused_calls == []
    fused(x[0])
    assert fused_calls == [(3, 4, 8, 8)]


def test_other_dtypes_devices_and_compiling_fall_back(fused_calls, monkeypatch):
    model = block(track_running_stats=False)
    fused = fuse_conv_blocks(model)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fused(x.double().float()), model(x))
    assert len(fused_calls) == 1
    with pytest.raises(RuntimeError):  # float64 input, float32 parameters: the modules' own error
        fused(x.double())
    assert len(fused_calls) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(fused(x), model(x))
    assert len(fused_calls) == 1


def test_updates_running_statistics_like_batch_norm(fused_calls):
    for momentum in (0.1, None):
        torch.manual_seed(0)
        a = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.MaxPool2d(2)).double()
        b = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.MaxPool2d(2)).double()
        fused = fuse_conv_blocks(a)
        for step in range(3):
            x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * (step + 1) + step
            out = fused(x)
            torch.testing.assert_close(out, b(x))
        # the updates land in the model's own buffers
        for name, buf in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[name], buf, msg=name)
    assert len(fused_calls) == 6


def test_parameters_buffers_and_children_are_shared():
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    fused = fuse_conv_blocks(model)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(fused.parameters(), model.parameters()))
    assert list(fused.state_dict()) == list(model.state_dict())
    assert all(fused.state_dict(keep_vars=True)[k] is v for k, v in model.state_dict(keep_vars=True).items())
    with_stats = block()
    assert all(b is c for b, c in zip(fuse_conv_blocks(with_stats).buffers(), with_stats.buffers()))
    assert len(list(with_stats.buffers())) == 3
    # the evaluator's ANIL split reaches the body and head by name
    assert getattr(fused, "head") is model.head
    assert [id(m) for m in getattr(fused, "features")] == [id(m) for m in model.features]
    assert fused.config is model.config


def test_functional_call_with_the_models_names(fused_calls):
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    fused = fuse_conv_blocks(model)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    params = {n: (p.detach() * 1.1).requires_grad_() for n, p in model.named_parameters()}
    got = functional_call(fused, params, (x,))
    want = functional_call(model, params, (x,))
    assert len(fused_calls) == 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.square().sum(), list(params.values()))
    g_want = torch.autograd.grad(want.square().sum(), list(params.values()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the swap was temporary: the model's (shared) parameters are back
    assert all(p is q for p, q in zip(fused.parameters(), model.parameters()))


def test_nested_sequentials_copy_only_the_path(fused_calls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.body = nn.ModuleDict({"a": block(4, 4, track_running_stats=False), "b": nn.Identity()})
            self.extra = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.extra(self.body["b"](self.body["a"](self.stem(x)))) * self.scale

    net = Net()
    fused = fuse_conv_blocks(net)
    assert count_fusable(net) == 1 and type(fused) is Net
    assert fused.stem is net.stem and fused.extra is net.extra and fused.body["b"] is net.body["b"]
    assert fused.body is not net.body and isinstance(fused.body["a"], FusedSequential)
    assert type(net.body["a"]) is nn.Sequential
    assert fused.scale is net.scale
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in net.named_parameters()]
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-6)
    assert fused_calls == [(3, 4, 8, 8)]


def test_sequential_subclasses(fused_calls):
    class Plain(nn.Sequential):
        pass

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    plain = Plain(*block(track_running_stats=False))
    fused = fuse_conv_blocks(plain)
    assert isinstance(fused, Plain) and isinstance(fused, FusedSequential)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fused(x), plain(x))
    assert len(fused_calls) == 1
    custom = Custom(*block(track_running_stats=False))
    assert count_fusable(custom) == 0 and fuse_conv_blocks(custom) is custom  # its own forward is kept


def test_editing_or_slicing_the_fused_sequential_stays_correct(fused_calls):
    model = nn.Sequential(*block(track_running_stats=False), *block(4, 4, track_running_stats=False))
    fused = fuse_conv_blocks(model)
    x = torch.rand(3, 1, 8, 8)
    head = fused[:4]
    assert isinstance(head, FusedSequential) and count_fusable(head) == 1
    torch.testing.assert_close(head(x), model[:4](x))
    assert fused_calls == [(3, 4, 8, 8)]
    fused.insert(2, nn.Identity())  # the first run is broken up; the second still fuses
    torch.testing.assert_close(fused(x), model(x))
    assert fused_calls == [(3, 4, 8, 8), (3, 4, 4, 4)] and len(model) == 8


def test_shared_module_stays_one_module():
    inner = block(track_running_stats=False)
    outer = nn.Sequential(inner, nn.Identity())
    outer.add_module("again", inner)
    fused = fuse_conv_blocks(outer)
    assert fused[0] is fused[2] and fused[0] is not inner


def test_hooks_on_the_containers_fire():
    model = Conv4(3, hidden=8)
    seen = []
    model.features.register_forward_hook(lambda m, i, o: seen.append("features"))
    model.register_forward_pre_hook(lambda m, i: seen.append("model"))
    fuse_conv_blocks(model)(torch.rand(2, 1, 28, 28))
    assert seen == ["model", "features"]


def test_nothing_to_fuse_returns_the_model(monkeypatch):
    mlp = SineMLP()
    assert count_fusable(mlp) == 0 and fuse_conv_blocks(mlp) is mlp
    model = Conv4(3, hidden=8)
    fused = fuse_conv_blocks(model)
    assert fuse_conv_blocks(fused) is fused  # already fused
    monkeypatch.setattr(_extension, "available", lambda: False)
    assert fuse_conv_blocks(model) is model
    with pytest.raises(ValueError, match="model: expected an nn.Module"):
        fuse_conv_blocks(lambda x: x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_and_channels_last(fused_calls, channels_last):
    torch.manual_seed(0)
    model = Conv4(3, hidden=16)
    fused = fuse_conv_blocks(model)
    x = torch.rand(4, 1, 28, 28)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(x), model(x)
    assert len(fused_calls) == 4 and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------ MetaLearner(fused=True)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps,adapt", [(1, "all"), (2, "all"), (1, "head")])
def test_fused_meta_gradient_matches_the_plain_loop(first_order, steps, adapt, fused_calls):
    # MAML's meta-gradient (Finn et al. 2017, Alg. 1; Fallah et al. eq. 5, first order eq. 8)
    # from an independent per-task autograd loop with ATen's modules, float64.
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    algo = fastmeta.MAML(0.4, steps, first_order=first_order)
    learner = fastmeta.MetaLearner(model, algo, adapt=adapt, strategy="loop", fused=True)
    got = learner.meta_gradient(batch).grad
    assert fused_calls  # the fused op did run
    assert rel_err(got, oracle(model, batch, 0.4, steps, first_order, adapt)) < 1e-9


@pytest.mark.parametrize("first_order", [False, True])
def test_fused_channels_last_meta_gradient_matches_the_plain_loop(first_order, fused_calls):
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4, 1, first_order=first_order), strategy="loop",
                                   fused=True, channels_last=True)
    got = learner.meta_gradient(batch).grad
    assert fused_calls
    assert rel_err(got, oracle(model, batch, 0.4, 1, first_order)) < 1e-9


def test_fused_bf16_meta_gradient_is_float32_and_close(fused_calls):
    torch.manual_seed(0)
    model = Conv4(3, hidden=16)
    ref = oracle(model.double(), conv_batch(), 0.4, 1, False)
    model.float()
    res = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", fused=True, bf16=True
                               ).meta_gradient(conv_batch(dtype=torch.float32))
    assert fused_calls
    assert res.grad.dtype == torch.float32
    err, cos = rel_err(res.grad.double(), ref), float(F.cosine_similarity(res.grad.double(), ref, dim=0))
    # As the unfused bf16 mode (test_speed_modes): bf16 rounding, not a wrong formula.
    assert 1e-3 < err < 0.5 and cos > 0.95, (err, cos)


def test_fused_flag_is_validated():
    with pytest.raises(ValueError, match="fused: expected a bool"):
        fastmeta.MetaLearner(Conv4(3, hidden=8), fastmeta.MAML(0.4), fused="yes")
