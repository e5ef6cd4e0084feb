"""The training-aware search of paper §3.3, run: candidates trained with the project's trainer and data
path, timed with the trainer's own step, ranked by ``A * S^w * P^v`` (``effnetv2 search``).

``runner``: the loop (proxy training, step timing, resumable); ``results``: ``results.jsonl`` and the
settings it was made with; ``report``: the top-k table, the chart and ``best.json``. The space, the
reward and scaling are in :mod:`effnetv2.model.search`.
"""

from .runner import (
           SearchOptions,
           StepTimer,
           proxy_config,
           proxy_size,
           rank_check,
           run_search,
           train_candidate,
)

__all__ = ["SearchOptions", "StepTimer", "proxy_config", "proxy_size", "rank_check", "run_search",
           "train_candidate"]
