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
from fastmeta.nn import FusedSequential, _runtime, count_fusable, fuse_conv_blocks, fusion_report
from reference import rel_err
from test_speed_modes import conv_batch, oracle

if not _extension.available():
    pytest.skip(f"native extension unavailable: {_extension.reason()}", allow_module_level=True)


@pytest.fixture
def fused_calls(monkeypatch):
    """The input shapes of every fused run (bn_relu_pool call made by a fused chain)."""
    calls = []
    original = _runtime.bn_relu_pool

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(_runtime, "bn_relu_pool", counting)
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
    # MaxPool2d(3) (only BN -> ReLU fuses), a negative LeakyReLU slope, BatchNorm in eval mode with
    # running statistics, a functorch transform, hooks.
    seq = block(pool=3, track_running_stats=False)
    assert count_fusable(seq) == 1
    fuse_conv_blocks(seq)(torch.rand(3, 1, 8, 8))
    assert fused_calls == [(3, 4, 8, 8)]
    fused_calls.clear()
    neg = nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(-0.5), nn.MaxPool2d(2))
    assert count_fusable(neg) == 0 and fuse_conv_blocks(neg) is neg
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
    # its own forward is traced: the run fuses and the "* 2" stays
    custom = Custom(*block(track_running_stats=False))
    fused = fuse_conv_blocks(custom)
    assert count_fusable(custom) == 1 and isinstance(fused, Custom) and not isinstance(fused, FusedSequential)
    torch.testing.assert_close(fused(x), custom(x))
    assert len(fused_calls) == 2


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
    unfused = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", bf16=True
                                   ).meta_gradient(conv_batch(dtype=torch.float32)).grad.double()
    first_order = fastmeta.MetaLearner(model, fastmeta.MAML(0.4, first_order=True), strategy="loop", fused=True,
                                       bf16=True).meta_gradient(conv_batch(dtype=torch.float32)).grad.double()
    # bf16 rounding (8 mantissa bits) through four batch norms and a second-order graph is large
    # here (0.26 for the unfused bf16 mode, as for the fused one; float32 gives 1.5e-6): the fused
    # kernels may be no worse than twice the same-precision ATen path (STYLE's tolerance rule),
    # and must show bf16 did run (> 1e-3). A wrong second-order term would not pass: FO-MAML's
    # gradient (no second-order term; ~1.0 from the oracle) lies outside the band.
    band = (lambda g: 1e-3 < rel_err(g, ref) <= 2 * rel_err(unfused, ref))
    assert band(res.grad.double()), (rel_err(res.grad.double(), ref), rel_err(unfused, ref))
    assert not band(first_order), rel_err(first_order, ref)


def test_fused_flag_is_validated():
    with pytest.raises(ValueError, match="fused: expected a bool"):
        fastmeta.MetaLearner(Conv4(3, hidden=8), fastmeta.MAML(0.4), fused="yes")


# ------------------------------------------------------------------------------ traced modules
class ResBlock(nn.Module):
    """ResNet-12's block (Lee et al. 2019, MetaOptNet): three conv3x3-BN-LeakyReLU(0.1) layers (the
    third without its activation), a 1x1 conv + BN shortcut, add, LeakyReLU, MaxPool2d(2); one
    activation module used three times, as in the original code."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv3, self.bn3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.relu, self.maxpool = nn.LeakyReLU(0.1), nn.MaxPool2d(2)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return self.maxpool(self.relu(out))


class TinyResNet12(nn.Module):
    """Four residual blocks of widths 3-4-5-6 on 16x16 inputs (16 -> 8 -> 4 -> 2 -> 1), linear head."""

    def __init__(self, ways=3, c_in=1, widths=(3, 4, 5, 6), slope=0.1):
        super().__init__()
        chans = (c_in,) + tuple(widths)
        self.blocks = nn.ModuleList(ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:]))
        for b in self.blocks:
            b.relu.negative_slope = slope
        self.head = nn.Linear(widths[-1], ways)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(torch.flatten(x, 1))


class UserBlock(nn.Module):
    """A user-style module: a chain whose pool is the activation's only user, a batch norm whose
    output has two users (not a chain), and a ReLU-less BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn, self.act, self.pool = nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        self.bn2, self.act2 = nn.BatchNorm2d(1), nn.LeakyReLU(0.2)
        self.skip = nn.AvgPool2d(2)

    def forward(self, x):
        h = self.bn2(x)
        y = self.pool(self.act(self.bn(self.conv(x + self.act2(h) + h))))
        return y + self.skip(x)


def test_traced_resnet12_block_chains(fused_calls):
    torch.manual_seed(0)
    model = TinyResNet12().double()
    assert count_fusable(model) == 8  # bn1 -> relu and bn2 -> relu per block; bn3 feeds the add
    fused = fuse_conv_blocks(model)
    assert isinstance(fused, TinyResNet12) and isinstance(fused.blocks[0], ResBlock) and count_fusable(fused) == 8
    assert fusion_report(fused)[0] == "blocks.0 (FusedResBlock): 2 chains [bn1 -> relu, bn2 -> relu]"
    assert fused.blocks[0].downsample is model.blocks[0].downsample and fused.head is model.head
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    assert fused_calls == [(4, 3, 16, 16)] * 2 + [(4, 4, 8, 8)] * 2 + [(4, 5, 4, 4)] * 2 + [(4, 6, 2, 2)] * 2


def test_traced_user_module(fused_calls):
    torch.manual_seed(0)
    model = UserBlock().double()
    assert count_fusable(model) == 1
    fused = fuse_conv_blocks(model)
    assert fusion_report(fused) == ["<root> (FusedUserBlock): 1 chain [bn -> act -> pool]"]
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    assert fused_calls == [(3, 4, 8, 8)]


def test_untraceable_forward_falls_back_and_says_why(fused_calls):
    class Branchy(nn.Module):  # control flow on a tensor value: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = block(track_running_stats=False)
            self.bn, self.act = nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()

        def forward(self, x):
            y = self.body(x)
            return self.act(self.bn(y)) if y.sum() > 0 else y

    model = Branchy()
    report = fusion_report(model)
    assert len(report) == 2 and report[0].startswith("<root> (Branchy): not traced (TraceError")
    assert report[1] == "body (Sequential): 1 chain"
    fused = fuse_conv_blocks(model)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fused(x), model(x))
    assert fused_calls == [(3, 1, 8, 8)[:1] + (4, 8, 8)]  # the Sequential child still fuses; the root's chain not


def test_traced_forward_follows_training_flags(fused_calls):
    class Flagged(nn.Module):  # Python control flow on self.training is frozen by the trace
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(2), nn.LeakyReLU(0.1)

        def forward(self, x):
            y = self.act(self.bn(x))
            return y * 2 if self.training else y

    torch.manual_seed(0)
    model = Flagged().double()
    fused = fuse_conv_blocks(model)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x))
    assert len(fused_calls) == 1
    model.eval()  # the children (shared) change flags: the original forward runs, in eval mode
    fused.eval()
    torch.testing.assert_close(fused(x), model(x))
    assert len(fused_calls) == 1
    fused.train()
    model.train()
    torch.testing.assert_close(fused(x), model(x))
    assert len(fused_calls) == 2  # flags as at fuse time again: the traced forward runs, fused


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_fused_residual_meta_gradient_matches_the_plain_loop(first_order, strategy, fused_calls):
    # MAML on the residual net with LeakyReLU(0.1): fused=True == fused=False == an independent
    # per-task autograd loop, float64. Guard: the same net with ReLU (slope 0) has a meta-gradient far
    # from this one, so a kernel that dropped the slope would fail.
    torch.manual_seed(0)
    model = TinyResNet12().double()
    batch = conv_batch(size=16)
    algo = fastmeta.MAML(0.4, 1, first_order=first_order)
    got = fastmeta.MetaLearner(model, algo, strategy=strategy, fused=True).meta_gradient(batch).grad
    unfused = fastmeta.MetaLearner(model, algo, strategy=strategy).meta_gradient(batch).grad
    want = oracle(model, batch, 0.4, 1, first_order)
    assert bool(fused_calls) == (strategy == "loop")  # under vmap every chain falls back
    assert rel_err(got, want) < 1e-9 and rel_err(unfused, want) < 1e-9
    for b in model.blocks:
        b.relu.negative_slope = 0.0
    assert rel_err(oracle(model, batch, 0.4, 1, first_order), want) > 1e-3


def test_fused_conv4_meta_gradient_is_not_the_wrong_order(fused_calls):
    # Guard for the Conv-4 comparison above: FO-MAML and MAML differ far beyond 1e-9 here.
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    got = fastmeta.MetaLearner(model, fastmeta.MAML(0.4, 1), strategy="loop", fused=True).meta_gradient(batch).grad
    assert rel_err(got, oracle(model, batch, 0.4, 1, True)) > 1e-3
    assert rel_err(got, oracle(model, batch, 0.4, 1, False)) < 1e-9


def test_unpooled_chains_on_channels_last_inputs_run_their_modules(fused_calls):
    # BN -> LeakyReLU without a pool: fused on NCHW inputs, but on channels_last ones ATen's batch
    # norm is the faster path, so the chain runs its modules (same values either way).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.MaxPool2d(2))
    fused = fuse_conv_blocks(model)
    x = torch.randn(4, 3, 8, 8)
    want = model(x)
    assert torch.allclose(fused(x), want, atol=1e-5) and len(fused_calls) == 2
    fused_calls.clear()
    got = fused(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, want, atol=1e-5)
    assert fused_calls == [(4, 8, 8, 8)]  # only the pooled chain went through the fused op
