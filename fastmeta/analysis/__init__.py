"""Loss landscapes, sharpness and generalization gaps of meta-learned models (Sharp-MAML Fig. 1/4, eq. 7, sec. 5.3).

* :func:`loss_landscape` -- 1-D/2-D landscapes along filter-normalized random directions (Li et al. 2018),
  of the MAML objective ``L(theta'_m(theta); D'_m)`` or the plain loss;
* :func:`sharpness` -- eq. 7 by projected gradient ascent (k = 1 is SAM's eq. 8a);
* :func:`generalization_gap` -- meta-train vs meta-test accuracy/loss with 95% CIs;
* ``fastmeta landscape --ckpt A.pt [--ckpt B.pt ...] --out DIR`` -- all of it as PNGs and a table.
"""
from .generalization import GeneralizationGap, generalization_gap
from .landscape import Landscape, filter_normalize, loss_landscape, random_directions
from .sharpness import Sharpness, sharpness

__all__ = ["loss_landscape", "Landscape", "random_directions", "filter_normalize", "sharpness", "Sharpness",
           "generalization_gap", "GeneralizationGap"]
