"""Iterative RLHF (`tether loop`): rounds of sample -> select -> collect -> reward model -> policy -> eval.

run.py holds the config and the rounds, select.py which pairs get labelled, collect.py the label
sources (simulated annotators, the feedback app, an AI judge), report.py the per-round report."""
