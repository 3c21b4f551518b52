"""Measure models side by side: perplexity, per-layer diagnostics, generations, reports.

`dus compare` (base vs unhealed vs healed) and `dus scan` (where to cut) both read
hidden states from one forward pass per text window; the modules here each do one job:
text loading, model loading, the windowed pass, per-layer statistics, generation,
plots, the report and the optional W&B / lm-evaluation-harness hooks.
"""
