"""What the console of a run shows: the progress bar and the result table, and an expected error (a bad value, a
missing file: ``one_line_errors``) as one line, without a traceback; without three known, harmless texts that
libraries print on every run (and nothing broader is silenced):

- Lightning's warning that ``ModelCheckpoint`` with manual optimisation saves the state after the optimizer
  step, with a code sample (our checkpoints are meant to hold exactly that state);
- Lightning's "💡 Tip" advertising its cloud logger / model registry;
- torch's FutureWarning about ``isinstance(treespec, LeafSpec)``, raised inside Lightning's own pytree helper.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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


class UserError(Exception):
    """Mixed into an exception class whose errors come from the user's input or machine (a diverged run, a busy run
    folder, a full disk), not from a bug: the command line shows them as one line (``one_line_errors``)."""


# ValueError: a bad value or file content (ImageReadError too); OSError: a missing, unreadable or unwritable file;
# MemoryError: too large an input (odm-sr-upscale suggests --tile)
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError, UserError)
TRACEBACK_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch; the argparse commands also take --traceback


@contextmanager
def one_line_errors(prog: str, traceback: bool = False, also: tuple[type[BaseException], ...] = ()
                    ) -> Iterator[None]:
    """Inside the block, an ``EXPECTED_ERRORS`` (or ``also``) error exits with status 1 and the one line
    ``<prog>: error: <message>`` instead of a traceback; ``traceback`` or ``$HYDRA_FULL_ERROR=1`` let it through
    with its traceback. Other exceptions (bugs) always keep theirs."""
    try:
        yield
    except (*EXPECTED_ERRORS, *also) as err:
        if traceback or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        raise SystemExit(f"{prog}: error: {err}") from None


__all__ = ["EXPECTED_ERRORS", "UserError", "one_line_errors", "quiet_known_noise"]
