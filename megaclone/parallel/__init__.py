"""Tensor/pipeline/data parallelism: layout and process groups, TP layers and collectives."""

from megaclone.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclone.parallel.layers import (
    ColumnParallelLinear,
    ColumnParallelNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megaclone.parallel.layout import Layout, TPGroup, build_layout
from megaclone.parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
    sum_over_tp_region,
)
from megaclone.parallel.random import TPRNGTracker

__all__ = ["ColumnParallelLinear", "ColumnParallelNorm", "Layout", "RowParallelLinear", "TPGroup", "TPRNGTracker",
           "VocabParallelEmbedding", "build_layout", "copy_to_tp_region", "gather_from_tp_region",
           "reduce_from_tp_region", "scatter_to_tp_region", "sum_over_tp_region", "vocab_parallel_cross_entropy"]
