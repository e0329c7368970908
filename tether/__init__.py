"""tether: reinforcement learning from human feedback, end to end.

The package root imports nothing heavy, so that `tether label` (the annotation app) starts without torch.
"""

__version__ = "0.1.0"
