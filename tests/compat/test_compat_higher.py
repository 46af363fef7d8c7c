"""fastmeta.compat.higher against the real ``higher`` package (the oracle): float64 meta-gradients,
fast-weight gradients, outputs and buffers agree to 1e-10 relative on models with BatchNorm
(train mode, running statistics), Dropout (same RNG stream) and a buffer used in forward, for
SGD (momentum, dampening, nesterov, weight decay) and Adam (weight decay, amsgrad), 1 and 3 steps,
``copy_initial_weights`` and ``track_higher_grads`` both ways."""
import pytest
import torch
import torch.nn.functional as F

import fastmeta.compat.higher as compat_higher
from compat_cases import grads_of, make_model, make_tasks, rel_err

real_higher = pytest.importorskip("higher")

TOL = 1e-10
OPTS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam-wd-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.01, amsgrad=True),
}


def run(lib, kind, make_opt, steps, copy, track, override=None, step_override=None, prestep=False,
        eval_query=False, seed=100):
    """The canonical higher MAML loop over two tasks; returns everything observable."""
    model = make_model(kind)
    tasks = make_tasks(kind)
    opt = make_opt(model)
    if prestep:  # populate the optimizer's own state (momentum buffers, Adam moments), copied by higher
        F.cross_entropy(model(tasks[0][0]), tasks[0][1]).backward()
        opt.step()
        model.zero_grad()
    out = {k: [] for k in ("fast", "init", "logits", "buffers")}
    for t, (sx, sy, qx, qy) in enumerate(tasks):
        torch.manual_seed(seed + t)  # one dropout stream per task, the same for both libraries
        with lib.innerloop_ctx(model, opt, copy_initial_weights=copy, track_higher_grads=track,
                               override=override) as (fmodel, diffopt):
            for s in range(steps):
                diffopt.step(F.cross_entropy(fmodel(sx), sy), override=step_override if s == 1 else None)
            if eval_query:
                fmodel.eval()
            logits = fmodel(qx)
            q = F.cross_entropy(logits, qy)
            out["fast"] += torch.autograd.grad(q, list(fmodel.parameters()), retain_graph=True, allow_unused=True)
            if track:
                out["init"] += torch.autograd.grad(q, list(fmodel.parameters(time=0)), retain_graph=True,
                                                   allow_unused=True)
            out["logits"].append(logits.detach())
            out["buffers"] += [b.detach().clone() for b in fmodel.buffers()]
            q.backward()
    out["model"] = grads_of(model)
    out["model_buffers"] = [b.clone() for b in model.buffers()]
    out["model_training"] = model.training
    out["extra"] = model
    return out


def assert_same(ours, ref, copy, track):
    assert rel_err(ours["logits"], ref["logits"]) <= TOL
    assert rel_err(ours["fast"], ref["fast"]) <= TOL
    if track:
        assert rel_err(ours["init"], ref["init"]) <= TOL
    if copy or not track:
        # copy_initial_weights=True: the gotcha; track_higher_grads=False: every step detaches.
        assert all(g is None for g in ours["model"]) and all(g is None for g in ref["model"])
    else:
        assert rel_err(ours["model"], ref["model"]) <= TOL
    assert len(ours["buffers"]) == len(ref["buffers"])
    for a, b in zip(ours["buffers"] + ours["model_buffers"], ref["buffers"] + ref["model_buffers"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    assert ours["model_training"] == ref["model_training"]


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("copy", [True, False], ids=["copy", "nocopy"])
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_matches_higher(kind, steps, opt, copy, track):
    make_opt = lambda m: OPTS[opt](m.parameters())  # noqa: E731
    ref = run(real_higher, kind, make_opt, steps, copy, track)
    ours = run(compat_higher, kind, make_opt, steps, copy, track)
    assert_same(ours, ref, copy, track)
    if opt != "sgd" and track and not copy and (steps > 1 or opt != "sgd-momentum-dampening"):
        # Guard: the optimizer's extra terms matter here, so ignoring them would fail the test
        # (plain momentum's first step is an SGD step: buf = g).
        plain = run(real_higher, kind, lambda m: OPTS["sgd"](m.parameters()), steps, copy, track)
        assert rel_err(plain["model"], ref["model"]) > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_guard_second_order_differs_from_first(kind):
    # The meta-gradient (through the steps) differs from the first-order one (at the adapted
    # weights): a layer that dropped create_graph would fail the comparisons above.
    ref = run(real_higher, kind, lambda m: OPTS["sgd"](m.parameters()), 3, True, True)
    assert rel_err(ref["fast"], ref["init"]) > 1e-3
    # Same seed, same outputs; another RNG stream changes them where there is Dropout.
    again = run(real_higher, kind, lambda m: OPTS["sgd"](m.parameters()), 3, True, True)
    other = run(real_higher, kind, lambda m: OPTS["sgd"](m.parameters()), 3, True, True, seed=7)
    assert rel_err(again["logits"], ref["logits"]) == 0.0
    assert (rel_err(other["logits"], ref["logits"]) > 1e-3) == (kind == "mlp")


def _groups(m):
    head = list(m.l2.parameters())
    body = [p for p in m.parameters() if all(p is not h for h in head)]
    return [{"params": body, "lr": 0.1}, {"params": head, "lr": 0.05, "momentum": 0.5}]


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_param_groups_override_and_learned_lr(name):
    # Per-group hyperparameters, a construction-time override with a learned (requires_grad)
    # learning rate, and a step-time override that persists (higher's semantics).
    results = []
    for lib in (real_higher, compat_higher):
        lr = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        if name == "sgd":
            make = lambda m: torch.optim.SGD(_groups(m), lr=0.1, momentum=0.9)  # noqa: E731
            step_override = {"momentum": [0.3, 0.2]}
        else:
            make = lambda m: torch.optim.Adam(_groups(m), lr=0.01)  # noqa: E731
            step_override = {"betas": [(0.5, 0.9)]}
        out = run(lib, "mlp", make, 3, False, True, override={"lr": [lr, 0.02]}, step_override=step_override)
        out["lr_grad"] = lr.grad.clone()
        results.append(out)
    ref, ours = results
    assert_same(ours, ref, False, True)
    assert rel_err([ours["lr_grad"]], [ref["lr_grad"]]) <= TOL and float(ref["lr_grad"].abs()) > 0


@pytest.mark.parametrize("opt", ["sgd-nesterov-wd", "adam"])
def test_existing_optimizer_state_is_copied(opt):
    make_opt = lambda m: OPTS[opt](m.parameters())  # noqa: E731
    ref = run(real_higher, "mlp", make_opt, 2, False, True, prestep=True)
    ours = run(compat_higher, "mlp", make_opt, 2, False, True, prestep=True)
    assert_same(ours, ref, False, True)
    fresh = run(real_higher, "mlp", make_opt, 2, False, True, prestep=False)
    assert rel_err(fresh["fast"], ref["fast"]) > 1e-6  # the copied state matters


def test_eval_mode_of_fmodel_is_its_own():
    # fmodel.eval(): BatchNorm uses the running statistics of fmodel's own buffer copies (updated
    # by its inner steps); the model itself stays in training mode with its buffers untouched.
    make_opt = lambda m: OPTS["adam"](m.parameters())  # noqa: E731
    ref = run(real_higher, "mlp", make_opt, 3, False, True, eval_query=True)
    ours = run(compat_higher, "mlp", make_opt, 3, False, True, eval_query=True)
    assert_same(ours, ref, False, True)
    assert ours["model_training"] is True
    init = make_model("mlp")
    for a, b in zip(ours["model_buffers"], init.buffers()):
        assert torch.equal(a, b)


def test_explicit_params_and_history():
    model = make_model("mlp")
    sx, sy, qx, qy = make_tasks("mlp")[0]
    with compat_higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        new = diffopt.step(F.cross_entropy(fmodel(sx), sy))
        assert all(a is b for a, b in zip(new, fmodel.fast_params))
        assert len(list(fmodel.parameters(time=0))) == len(new) and len(fmodel._fast_params) == 2
        zeros = [torch.zeros_like(p) for p in new]
        fmodel.eval()
        out = fmodel(qx, params=zeros)  # as higher: explicit params become the latest fast weights
        assert torch.equal(out, model.l2.bias.new_zeros(9, 3)) and fmodel.fast_params[0] is zeros[0]
