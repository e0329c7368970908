"""tether: reinforcement learning from human feedback, end to end.

The package root imports nothing heavy, so that `tether label` (the annotation app) starts without torch.
"""

import os

# tether loads models only from local folders: never let a typo turn into a hub download (or into
# minutes of retries on a machine without network). Set HF_HUB_OFFLINE=0 to opt out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers draws a progress bar per model load ("Loading weights") and save ("Writing model shards"):
# local loads of small models take milliseconds, and the bars crowd out the run's own lines. They follow
# huggingface_hub's switch; set HF_HUB_DISABLE_PROGRESS_BARS=0 to see them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
