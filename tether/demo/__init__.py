"""The experiments that show tether working, each composed from the stages' own configs.

    sentiment.py  `tether demo`: controlled sentiment on the movie-review corpus, end to end on a CPU
    report.py     its evaluation (every policy on held-out prompts) and report.md + plots
    io.py         atomic JSON / JSON-lines helpers
"""
