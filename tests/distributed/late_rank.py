"""`tether dpo` under torchrun with rank 1 late: its look for the reference-logprob cache waits 3 s, long
enough for rank 0 to compute and write the cache first (what a loaded machine does by chance).

    torchrun --standalone --nproc_per_node=2 tests/distributed/late_rank.py key=value ...
"""

import os
import pathlib
import sys
import time

from tether.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        exists = pathlib.Path.exists

        def late(self, *a, **kw):
            if self.name == "ref_logps.pt":
                time.sleep(3)
            return exists(self, *a, **kw)

        pathlib.Path.exists = late
    rc = main(["dpo", *sys.argv[1:]])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)
