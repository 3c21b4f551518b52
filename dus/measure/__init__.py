"""Measuring a loaded model on text: sliding-window perplexity, per-layer statistics of
the residual stream, token streams, and the tokenizer check that makes perplexities
comparable. compare, scan, heal's calibration and the benchmarks all measure with this."""
