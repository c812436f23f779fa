"""HyperCloning: widen (and deepen) a trained small model so that the grown one computes the same function.

Works one target shard at a time: every widened tensor slice is built from the contiguous small
slice it copies, with layout-invariant zero-sum noise (docs/design.md, "Clone rules", "Zero-sum noise"); under
depth growth from the source block its target block copies (docs/design.md, "Depth growth").
"""

from megaclone.clone.depth import ZEROED_ROLES, DepthPlan, deepen_model_config, depth_plan, plan_depth
from megaclone.clone.moments import MOMENT_KINDS, CarryFactors, carry_factors, check_carry_possible, clone_moment
from megaclone.clone.monitor import copy_similarity
from megaclone.clone.noise import NOISE_ROLES
from megaclone.clone.plan import (
    VARIANTS,
    AxisMap,
    GroupRowsMap,
    axis_factor,
    axis_maps,
    clone_factors,
    embedding_divisor,
    groups_factor,
    grown_model_config,
    small_read_ranges,
    tied_fold,
    widen_model_config,
)
from megaclone.clone.rules import LINEAR_ROLES, Reader, clone_tensor
from megaclone.clone.shard import build_clone_shard, clone_checkpoint, describe_growth, growth_record, row_share

__all__ = ["LINEAR_ROLES", "MOMENT_KINDS", "NOISE_ROLES", "VARIANTS", "ZEROED_ROLES", "AxisMap", "CarryFactors",
           "DepthPlan", "GroupRowsMap", "Reader", "axis_factor", "axis_maps", "build_clone_shard", "carry_factors",
           "check_carry_possible", "clone_checkpoint", "clone_factors", "clone_moment", "clone_tensor",
           "copy_similarity", "deepen_model_config", "depth_plan", "describe_growth", "embedding_divisor",
           "growth_record", "groups_factor", "grown_model_config", "plan_depth", "row_share", "small_read_ranges",
           "tied_fold",
           "widen_model_config"]
