"""Run several tether stages in one process (one torchrun launch pays the start-up cost once).

    python tests/distributed/stages.py SPEC.json                                   # one process
    torchrun --standalone --nproc_per_node=2 tests/distributed/stages.py SPEC.json # two, gloo

SPEC.json: a list of [stage, [key=value, ...]]. Every rank runs every stage in order.
"""

import json
import sys

from tether.cli import main

if __name__ == "__main__":
    for stage, args in json.load(open(sys.argv[1])):
        rc = main([stage, *args])
        if rc:
            sys.exit(rc)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
