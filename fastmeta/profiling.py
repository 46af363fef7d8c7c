"""NVTX ranges for Nsight, plus ``torch.profiler`` labels, as one context manager.

``torch.cuda.nvtx`` raises on CPU builds of torch, so the ``nvtx`` package is used instead. Every
range lives in the NVTX domain ``fastmeta`` and is named by its phase alone (Nsight Systems shows
the domain beside the name, so the name does not repeat it):

    step            MetaLearner.step (contains meta_gradient)
    meta_gradient   the algorithm's meta-gradient and its finiteness check
    evaluate, adapt MetaLearner.evaluate / adapt (meta-testing)
    strategy        strategy="auto" timing the candidate evaluation strategies (first batch only)
    inner, outer    the inner loop; the query-set (outer) gradient
    perturb         Sharp-MAML's SAM perturbation
    hvp             HF-MAML's finite-difference Hessian-vector product

``torch.profiler`` has no domains, so there the same ranges are labelled ``fastmeta/<name>``.
"""
from __future__ import annotations

from torch._C._autograd import _profiler_enabled
from torch.autograd.profiler import record_function

DOMAIN = "fastmeta"

try:  # optional: a missing nvtx package only loses the Nsight ranges
    import nvtx as _nvtx

    _domain = _nvtx.get_domain(DOMAIN)
except Exception:  # pragma: no cover - depends on the environment
    _nvtx = _domain = None

# Event attributes per range name, made once: pushing prepared attributes costs ~0.1 us, building
# them (what nvtx.annotate does on every entry) ~0.5 us.
_attributes: dict = {}


class annotate:
    """Mark a region as NVTX range ``name`` in domain ``fastmeta`` (Nsight) and as
    ``fastmeta/<name>`` for ``torch.profiler``.

    A plain class rather than a generator-based context manager (that machinery alone costs
    ~1.5 us per range). ``record_function`` costs ~6 us per range even with no profiler running
    (~5% of a 1 ms sine MAML step, which has several ranges), so it is entered only while
    ``torch.profiler`` is recording; the NVTX range is always pushed. With no profiler attached a
    whole range costs ~0.8 us (~1.5 us through ``nvtx.annotate``, which builds its attributes on
    every entry).
    """

    __slots__ = ("name", "_rf", "_pushed")

    def __init__(self, name: str):
        self.name = name
        self._rf = None
        self._pushed = False

    @property
    def label(self) -> str:
        """The ``torch.profiler`` label."""
        return f"{DOMAIN}/{self.name}"

    def __enter__(self):
        if _profiler_enabled():
            self._rf = record_function(self.label)
            self._rf.__enter__()
        if _domain is not None:
            attrs = _attributes.get(self.name)
            if attrs is None:
                attrs = _attributes[self.name] = _domain.get_event_attributes(message=self.name)
            _domain.push_range(attrs)
            self._pushed = True
        return self

    def __exit__(self, *exc):
        if self._pushed:
            _domain.pop_range()
            self._pushed = False
        if self._rf is not None:
            self._rf.__exit__(*exc)
            self._rf = None
        return False


def nvtx_available() -> bool:
    return _domain is not None
