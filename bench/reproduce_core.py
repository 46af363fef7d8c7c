"""Shared machinery of ``bench/reproduce.py``: atomic result files, the per-run store that makes
every study resumable, chunked meta-training with early stopping on top of
:func:`fastmeta.training.train`'s resume, and the statistics behind the report (seed-paired
differences with t-based 95% CIs, the held / did-not-hold verdicts, the neighbourhood of the best
rate in a sweep).

Nothing here reads the real data on import; the Omniglot cache is installed only while a study
trains (see :func:`omniglot_cache`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

# How much work this process did, for the reports and for the tests that check that a rerun of a
# finished study trains nothing (a rerun must not call train() at all).
COUNTERS = {"train_calls": 0, "runs_started": 0, "runs_skipped": 0}


# --------------------------------------------------------------------------------- result files
def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``), so that an interrupted study never leaves a half-written result that a rerun
    would take for a finished run. Non-finite floats are written as JSON ``NaN``/``Infinity``
    (Python's json reads them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def copy_atomic(src, dst) -> None:
    """Copy a file atomically (same-folder temporary, then ``os.replace``)."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------- run store
def run_result(run_dir: Path, compute: Callable[[], dict], key: Optional[dict] = None) -> dict:
    """The result of one run (algorithm x seed x setting): read from ``run_dir/result.json`` when
    the run finished before (nothing is recomputed), else ``compute()``'d and written
    atomically. ``compute`` resumes from whatever checkpoint the run left in ``run_dir``.

    ``key``: everything that defines the run (its config and budget). It is written to
    ``run_dir/key.json`` when the run starts; a rerun whose key differs -- another budget in
    the same ``--out`` -- raises ``ValueError`` naming ``out`` instead of mixing the two.
    """
    run_dir = Path(run_dir)
    path, key_path = run_dir / "result.json", run_dir / "key.json"
    if key is not None:
        key = json.loads(json.dumps(key))  # the JSON form, as it is stored
        if key_path.exists():
            old = read_json(key_path)
            if old != key:
                diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                raise ValueError(f"out: the run in {run_dir} was made with other settings (they differ in {diff}); "
                                 f"use another --out, or delete that folder to redo the run")
    if path.exists():
        COUNTERS["runs_skipped"] += 1
        return read_json(path)
    COUNTERS["runs_started"] += 1
    run_dir.mkdir(parents=True, exist_ok=True)
    if key is not None and not key_path.exists():
        write_json(key_path, key)
    res = compute()
    write_json(path, res)
    return res


# ------------------------------------------------------------------------------- early stopping
def early_stopping(values: Sequence[float], patience: Optional[int], higher_is_better: bool = True
                   ) -> tuple[Optional[int], Optional[int]]:
    """``(best, stop)`` for a validation curve ``values`` (one value per evaluation, in order).

    ``best``: the index of the best value so far (the first one on ties: a later evaluation must
    strictly improve to count); None for an empty curve. ``stop``: the index of the evaluation at
    which training stops, i.e. the first evaluation that is the ``patience``-th in a row without
    improvement over the best before it; None while training goes on (and always with
    ``patience=None``). A non-finite value never improves.
    """
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience: expected an int >= 1 or None, got {patience!r}")
    best, since = None, 0
    for i, v in enumerate(values):
        v = float(v)
        better = math.isfinite(v) and (best is None or not math.isfinite(values[best]) or
                                       (v > values[best] if higher_is_better else v < values[best]))
        if best is None or better:
            best, since = i, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                return best, i
    return best, None


@contextlib.contextmanager
def omniglot_cache():
    """While active, ``fastmeta.training``'s task sources load each Omniglot root list once per
    process. A chunked run calls ``train()`` once per evaluation period and every call would
    otherwise decode all PNGs again (16 s on the shared subsets on a busy 2-core machine, as
    long as a 5-way chunk of 100 steps). A hook in ``TaskSource`` (a data cache argument) would
    make this patch unnecessary."""
    from fastmeta.training import config as cfgmod

    original = cfgmod.Omniglot
    cache: dict = {}

    def cached(roots, image_size: int = 28):
        key = (tuple(str(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)), image_size)
        if key not in cache:
            cache[key] = original(roots, image_size=image_size)
        return cache[key]

    cfgmod.Omniglot = cached
    try:
        yield cache
    finally:
        cfgmod.Omniglot = original


def chunked_training(run_dir: Path, cfg: dict, eval_every: int, max_steps: int, patience: Optional[int] = None,
                     minutes: Optional[float] = None, metric: str = "val_accuracy", log=print) -> dict:
    """Meta-train ``cfg`` (a :func:`fastmeta.training.train` config) in chunks of ``eval_every``
    steps, resuming its checkpoint ``run_dir/ckpt.pt`` each time, until

    * early stopping: ``patience`` evaluations in a row without a strictly better ``metric``
      (``val_accuracy``: higher is better; ``val_loss``: lower), see :func:`early_stopping`;
    * or ``max_steps`` steps;
    * or ``minutes`` of training wall-clock (validation included; checked at each evaluation,
      so the last chunk may overrun by up to one chunk).

    Every chunk ends with an evaluation on the same fixed validation tasks (``train``'s
    ``val_every``), and the checkpoint's ``history`` holds them all, so the stopping state is a
    function of the checkpoint alone: an interrupted run continues exactly where its last
    checkpoint was, bit for bit as an unbroken run (``train``'s resume). ``run_dir/best.pt`` is a
    copy of the checkpoint at the best evaluation. Wall-clock: each ``train`` call validates
    once, at its end, so a history entry's ``seconds`` is its chunk's time.

    Returns ``dict(steps, best_step, stop_reason, history, train_seconds, seconds_to_best,
    ckpt, best)`` (paths as strings). ``FloatingPointError`` from a diverging run propagates.
    """
    import torch

    from fastmeta.training import load_checkpoint, train

    for name, v in (("eval_every", eval_every), ("max_steps", max_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes: expected a number > 0 or None, got {minutes!r}")
    higher = {"val_accuracy": True, "val_loss": False}.get(metric)
    if higher is None:
        raise ValueError(f"metric: expected 'val_accuracy' or 'val_loss', got {metric!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_path = run_dir / "ckpt.pt", run_dir / "best.pt"
    while True:
        ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
        history = list(ckpt["history"]) if ckpt else []
        step = ckpt["step"] if ckpt else 0
        best, stop = early_stopping([h[metric] for h in history], patience, higher)
        if best is not None and history[best]["step"] == step:
            # The checkpoint is the best model: keep a copy before the next chunk moves it on (a
            # rerun after a crash right here finds the same state and copies again).
            held = torch.load(best_path, map_location="cpu", weights_only=True)["step"] if best_path.exists() else None
            if held != step:
                copy_atomic(ckpt_path, best_path)
        spent = sum(h["seconds"] for h in history)
        if stop is not None:
            reason = f"early stopping: {patience} evaluations without improvement"
            break
        if step >= max_steps:
            reason = f"max_steps {max_steps} reached"
            break
        if minutes is not None and spent >= 60 * minutes:
            reason = f"wall-clock budget of {minutes:g} min spent"
            break
        target = min(step + eval_every, max_steps)
        COUNTERS["train_calls"] += 1
        # test_tasks=1: train() meta-tests after every call; the real meta-test runs once, on the
        # chosen checkpoint, after the last chunk.
        train(dict(cfg, steps=target, val_every=eval_every, out=str(ckpt_path), resume=True, test_tasks=1),
              log=log)
    history = history[:stop + 1] if stop is not None else history
    return dict(steps=step, best_step=history[best]["step"] if best is not None else None, stop_reason=reason,
                history=history, train_seconds=spent,
                seconds_to_best=sum(h["seconds"] for h in history[:best + 1]) if best is not None else None,
                ckpt=str(ckpt_path), best=str(best_path) if best is not None else None)


def evaluate_checkpoint(path, test_tasks: int, sinusoid_pre: bool = False) -> dict:
    """Meta-test the model of a ``fastmeta train`` checkpoint on ``test_tasks`` tasks of its
    held-out split, drawn from the test sampler's seed (``seed + 20000``): every checkpoint of
    the same seed and setting is tested on the same tasks, which is what makes the per-seed
    comparison of algorithms paired. Returns the means, 95% CIs and per-task values."""
    from fastmeta.training import load_checkpoint
    from fastmeta.training.config import learner_from_checkpoint, source_from_checkpoint
    from fastmeta.training.evaluate import evaluate_tasks, pre_adaptation_loss

    ckpt = load_checkpoint(path)
    learner = learner_from_checkpoint(ckpt)
    src = source_from_checkpoint(ckpt)
    res = evaluate_tasks(learner, src.test, test_tasks)
    out = dict(step=ckpt["step"], test_loss=res.loss, test_loss_ci95=res.loss_ci95, test_tasks=res.num_tasks,
               per_task_loss=res.per_task_loss.double().tolist(), split=src.split,
               strategy=learner.chosen_strategy)
    if res.accuracy is not None:
        out.update(test_accuracy=res.accuracy, test_accuracy_ci95=res.accuracy_ci95,
                   per_task_accuracy=res.per_task_accuracy.double().tolist())
    if sinusoid_pre:
        out["pre_adaptation_loss"] = pre_adaptation_loss(learner, src.test, test_tasks)
    return out


# ------------------------------------------------------------------------------------ statistics
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard table values).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table for df <= 30, then
    the first two Cornish-Fisher terms around 1.96, within 1e-3 of the exact value)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: expected an int >= 1, got {df!r}")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and t-based 95% half-width of independent ``values`` (``ci95`` NaN for fewer than 2);
    ``lo``/``hi`` the interval's ends."""
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        raise ValueError("values: expected at least one value")
    m = sum(x) / n
    if n < 2 or not all(math.isfinite(v) for v in x):
        h = float("nan")
    else:
        sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
        h = t975(n - 1) * sd / math.sqrt(n)
    return dict(n=n, mean=m, ci95=h, lo=m - h, hi=m + h)


def paired_difference(base: dict, other: dict) -> dict:
    """Seed-paired difference ``other - base``: ``base`` and ``other`` map seed -> value (e.g. mean
    meta-test accuracy of a run). Uses the seeds both have; returns :func:`mean_ci` of the
    per-seed differences plus ``seeds`` and ``per_seed``. The CI is over seeds (t with n-1
    degrees of freedom): it covers the run-to-run variation of training, which a CI over the
    test tasks of one run does not."""
    seeds = sorted(set(base) & set(other), key=str)
    if not seeds:
        raise ValueError("base/other: no seed in common")
    d = [float(other[s]) - float(base[s]) for s in seeds]
    return dict(mean_ci(d), seeds=seeds, per_seed=d)


def task_paired_difference(base: Sequence[float], other: Sequence[float]) -> dict:
    """Task-paired difference ``other - base`` over the same test tasks (normal 95% CI,
    1.96 sd / sqrt(n), as :func:`fastmeta.metrics.ci95`): the uncertainty from the finite test
    set alone, given the two trained models."""
    if len(base) != len(other) or not base:
        raise ValueError(f"base/other: expected two equally long non-empty per-task lists, got {len(base)} and "
                         f"{len(other)}")
    d = [float(b) - float(a) for a, b in zip(base, other)]
    n = len(d)
    m = sum(d) / n
    h = 1.96 * math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1)) / math.sqrt(n) if n > 1 else float("nan")
    return dict(n=n, mean=m, ci95=h, lo=m - h, hi=m + h)


HELD, NOT_HELD, NOT_TESTABLE = "held", "did not hold", "not testable here"


def improvement_verdict(diff: dict, claimed: float = 0.0) -> tuple[str, str]:
    """Verdict on the claim "other improves on base (by ``claimed``, the paper's gain, if given)"
    from a :func:`paired_difference` ``diff`` (larger is better):

    * ``held``: the 95% CI lies above 0 (an improvement, whatever its size);
    * ``did not hold``: the CI excludes the claimed gain from above -- ``hi < claimed`` with a
      paper gain, ``hi <= 0`` without one -- and does not lie above 0;
    * ``not testable here``: fewer than 2 seeds (no CI), or the CI holds both 0 and the claimed
      gain (too wide to decide at this number of seeds).

    Returns ``(verdict, reason)``.
    """
    lo, hi = diff["lo"], diff["hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_TESTABLE, f"{diff['n']} seed(s): no seed-to-seed CI (needs >= 2 seeds with finite results)"
    span = f"difference {diff['mean']:+.4g}, 95% CI [{lo:+.4g}, {hi:+.4g}] over {diff['n']} seeds"
    if lo > 0:
        return HELD, span + " lies above 0"
    if (claimed > 0 and hi < claimed) or (claimed <= 0 and hi <= 0):
        what = f"the paper's gain {claimed:+.4g}" if claimed > 0 else "any gain"
        return NOT_HELD, span + f" excludes {what}"
    return NOT_TESTABLE, span + (f" holds both 0 and the paper's gain {claimed:+.4g}" if claimed > 0 else
                                 " holds 0 (too wide to decide)")


def rate_neighbourhood(rates: Sequence[float], losses: dict) -> dict:
    """The neighbourhood of the best rate of a sweep, where the optimum may lie given the data.

    ``rates``: the grid, increasing; ``losses``: seed -> list of test losses (one per rate; NaN or
    inf where the run diverged). The best rate has the lowest mean loss over seeds (a rate where
    any seed diverged counts as inf). Its *block* is the contiguous run of rates around it whose
    seed-paired difference to the best (:func:`paired_difference`) has a 95% CI reaching 0 or
    below, i.e. that the seeds cannot tell from the best (with one seed: the best alone). The
    neighbourhood is the open interval between the grid points adjacent to the block: a
    unimodal loss sampled on a grid has its minimizer strictly between the neighbours of the
    sampled minimum, and a noisy one anywhere the block reaches. An end of the grid in the block
    leaves that side open (None): the sweep does not bracket the optimum there.

    Returns ``dict(best_index, best_rate, block=[i, j], low, high, mean_loss)``.
    """
    rates = [float(r) for r in rates]
    if len(rates) < 2 or any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"rates: expected an increasing grid of >= 2 rates, got {rates}")
    seeds = sorted(losses, key=str)
    if not seeds or any(len(losses[s]) != len(rates) for s in seeds):
        raise ValueError(f"losses: expected seed -> {len(rates)} losses for every seed")

    def val(s, i):
        v = float(losses[s][i])
        return v if math.isfinite(v) else math.inf

    mean = [sum(val(s, i) for s in seeds) / len(seeds) for i in range(len(rates))]
    if not any(math.isfinite(m) for m in mean):
        raise ValueError("losses: every rate diverged for some seed; no best rate")
    b = min(range(len(rates)), key=lambda i: mean[i])

    def tied(i):
        if not math.isfinite(mean[i]) or len(seeds) < 2:
            return False
        d = paired_difference({s: val(s, b) for s in seeds}, {s: val(s, i) for s in seeds})
        return d["lo"] <= 0

    i = b
    while i - 1 >= 0 and tied(i - 1):
        i -= 1
    j = b
    while j + 1 < len(rates) and tied(j + 1):
        j += 1
    return dict(best_index=b, best_rate=rates[b], block=[i, j], low=rates[i - 1] if i > 0 else None,
                high=rates[j + 1] if j + 1 < len(rates) else None, mean_loss=mean)


def in_neighbourhood_verdict(alpha: float, nb: dict, rates: Sequence[float], name: str = "alpha*") -> tuple[str, str]:
    """Verdict on "``alpha`` lands within the best measured rate's neighbourhood" (see
    :func:`rate_neighbourhood`): ``held`` if ``low < alpha < high`` inside the swept range;
    ``did not hold`` if it lies outside the neighbourhood; ``not testable here`` if it lies
    beyond the grid on an open side (the sweep does not reach it), or if the neighbourhood is
    open on both sides (no swept rate is distinguishable from the best: a "held" would be
    vacuous)."""
    lo, hi = nb["low"], nb["high"]
    if lo is None and hi is None:
        return NOT_TESTABLE, (f"the seeds cannot tell any swept rate from the best ({nb['best_rate']:.4g}): more "
                              f"seeds, or a wider grid, are needed")
    where = (f"{name} = {alpha:.4g}; best rate {nb['best_rate']:.4g}, neighbourhood "
             f"({'open' if lo is None else f'{lo:.4g}'}, {'open' if hi is None else f'{hi:.4g}'})")
    if not math.isfinite(alpha):
        return NOT_TESTABLE, f"{name} is not finite"
    inside = (lo is None or alpha > lo) and (hi is None or alpha < hi)
    if not inside:
        return NOT_HELD, where
    if alpha < min(rates) or alpha > max(rates):
        return NOT_TESTABLE, where + f": {name} lies outside the swept rates [{min(rates):.4g}, {max(rates):.4g}] " \
                                     f"and the best rate is at that end of the grid"
    return HELD, where
