"""`dus scan`: where to cut before building.

measure.py reads one model's hidden states on held-out text (distance between the input
of layer l and of layer l+n for every l and n, ShortGPT's block influence); propose.py
turns them into the SOLAR trim, the duplication range and the pruning block that
should hurt least, and writes them as recipes; rank.py builds the top candidates and
ranks them by unhealed perplexity.
"""
