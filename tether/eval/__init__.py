"""Evaluation: reward-model quality, policy win rates and KL, reward-hacking signals, sycophancy probes
and preference-data checks. `tether eval {rm,policy,sycophancy,data}` (tether/eval/cli.py) writes a
Markdown report, PNG plots and metrics.json. Pure metrics: tether/eval/metrics.py."""
