"""Analyses: complexity accounting (storage, BitOPs; METHODS.md §6)."""

from odm_sr.analysis.complexity import bitops, complexity_table, find_quantizers, storage, summarize

__all__ = ["bitops", "complexity_table", "find_quantizers", "storage", "summarize"]
