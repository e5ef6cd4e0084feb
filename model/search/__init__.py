"""Training-aware architecture search and scaling (paper §3.3), the architecture side.

``space``: the factorised stage-based space around a backbone and reproducible random sampling;
``reward``: ``A * S^w * P^v`` and the Pareto front; ``scaling``: compound scaling of a found base into a
family with the V2 changes. Nothing here trains: the runner that trains candidates with the project's
trainer builds on these.
"""

from .reward import V_PARAMS, W_STEP_TIME, pareto_front, reward
from .scaling import Compound, Member, measure, scale_config, scale_family
from .space import (
    DEFAULT_BACKBONE,
    Candidate,
    SearchSpace,
    StageChoice,
    architecture_id,
    describe,
    operator_name,
    stage_table,
)

__all__ = ["DEFAULT_BACKBONE", "V_PARAMS", "W_STEP_TIME", "Candidate", "Compound", "Member", "SearchSpace",
           "StageChoice", "architecture_id", "describe", "measure", "operator_name", "pareto_front", "reward",
           "scale_config", "scale_family", "stage_table"]
