"""The console filters drop exactly the three known texts (odm_sr.console)."""

from __future__ import annotations

import logging
import warnings

from odm_sr.console import _NO_TIPS, _TIP_LOGGERS, quiet_known_noise


def test_only_the_known_texts_are_dropped(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but ...", UserWarning,
                      stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("method=odm starts from RANDOM weights", UserWarning, stacklevel=1)
        # the same text in another category is kept
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["method=odm starts from RANDOM weights",
                                              "`isinstance(treespec, LeafSpec)` is deprecated"]
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    try:
        with caplog.at_level(logging.INFO):
            rank_zero_info("💡 Tip: For seamless cloud logging ...")
            rank_zero_info("GPU available: False")
        assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
    finally:
        for name in _TIP_LOGGERS:
            logging.getLogger(name).removeFilter(_NO_TIPS)
