"""Analyses: complexity accounting (storage, BitOPs; METHODS.md §6), the supplement's distribution analyses
(S9, S10, Figures S1 and S2) and training time (S12) of METHODS.md §7, and result tables beside the paper's
numbers (§8)."""

from odm_sr.analysis.complexity import bitops, complexity_table, find_quantizers, storage, summarize
from odm_sr.analysis.distributions import (
    activation_histograms,
    feature_mismatch,
    feature_variance,
    odm_initialized,
    weight_stats,
)
from odm_sr.analysis.paper import paper_entry
from odm_sr.analysis.plots import plot_histograms, plot_weight_stats
from odm_sr.analysis.report import build_rows, load_runs, plot_report, to_latex, to_markdown, write_report
from odm_sr.analysis.timing import timing_table, training_time

__all__ = [
    "bitops", "complexity_table", "find_quantizers", "storage", "summarize",
    "activation_histograms", "feature_mismatch", "feature_variance", "odm_initialized", "plot_histograms",
    "plot_weight_stats", "weight_stats",
    "paper_entry",
    "build_rows", "load_runs", "plot_report", "to_latex", "to_markdown", "write_report",
    "timing_table", "training_time",
]
