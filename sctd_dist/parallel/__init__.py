"""Parallelism: launcher discovery, process groups, RNG streams and sequence-parallel mappings.

Kept apart from the model math: the model receives a `ParallelContext` and never touches global
parallel state.
"""

from sctd_dist.parallel.state import (
    MegatronMPU,
    ParallelContext,
    check_tp_size,
    initialize,
)

__all__ = ["MegatronMPU", "ParallelContext", "check_tp_size", "initialize"]
