"""Active learning: choose which unlabelled examples are worth labelling (`jaxgpt active`)."""

from jaxgpt.active.loop import ActiveConfig, ActiveLearner, load_config, run

__all__ = ["ActiveConfig", "ActiveLearner", "load_config", "run"]
