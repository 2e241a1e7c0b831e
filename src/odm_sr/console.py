"""What the console of a run shows: the progress bar and the result table, without three known, harmless texts
that libraries print on every run (and nothing broader is silenced):

- Lightning's warning that ``ModelCheckpoint`` with manual optimisation saves the state after the optimizer
  step, with a code sample (our checkpoints are meant to hold exactly that state);
- Lightning's "💡 Tip" advertising its cloud logger / model registry;
- torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, raised inside Lightning's own pytree helper.
"""

from __future__ import annotations

import logging
import warnings

_WARNINGS = (
    (UserWarning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


_NO_TIPS = _NoTips()


def quiet_known_noise() -> None:
    """Install the filters for the texts listed in the module docstring (idempotent)."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _NO_TIPS not in logger.filters:
            logger.addFilter(_NO_TIPS)


__all__ = ["quiet_known_noise"]
