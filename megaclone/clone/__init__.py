"""HyperCloning: widen a trained small model so that the wide one computes the same function.

Works one target shard at a time: every widened tensor slice is built from the contiguous small
slice it copies, with layout-invariant zero-sum noise (docs/design.md, "Clone rules", "Zero-sum noise").
"""

from megaclone.clone.moments import MOMENT_KINDS, CarryFactors, carry_factors, clone_moment
from megaclone.clone.monitor import copy_similarity
from megaclone.clone.noise import NOISE_ROLES
from megaclone.clone.plan import (
    VARIANTS,
    AxisMap,
    axis_factor,
    clone_factors,
    small_read_ranges,
    widen_model_config,
)
from megaclone.clone.rules import LINEAR_ROLES, Reader, clone_tensor
from megaclone.clone.shard import build_clone_shard, clone_checkpoint

__all__ = ["LINEAR_ROLES", "MOMENT_KINDS", "NOISE_ROLES", "VARIANTS", "AxisMap", "CarryFactors", "Reader",
           "axis_factor", "build_clone_shard", "carry_factors", "clone_checkpoint", "clone_factors", "clone_moment",
           "clone_tensor", "copy_similarity", "small_read_ranges", "widen_model_config"]
