"""A bug found in CI: under DDP, a rank that looked for DPO's reference-logprob cache after rank 0 had
written it loaded the file and skipped the barrier of the write, while rank 0 waited there: both hung."""

import os
import signal
import subprocess
import sys

from .util import REPO, env, pref_data, tiny_model


def test_dpo_under_ddp_with_a_late_rank_finishes(tmp_path):
    tiny_model(tmp_path / "model")
    pref_data(tmp_path / "pref.jsonl")
    args = ["batch_size=8", "max_steps=2", "seed=3", f"model={tmp_path / 'model'}", "track.progress=false", "engine.backend=ddp",
            "engine.threads=1", f"data.train={tmp_path / 'pref.jsonl'}", f"out={tmp_path / 'dpo'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "distributed" / "late_rank.py"), *args]
    log = open(tmp_path / "log.txt", "w")
    # its own process group, killed whole on a timeout: a hung worker must not hold the test's pipes open
    p = subprocess.Popen(cmd, cwd=REPO, env=env(1), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise AssertionError("the two ranks hung: " + (tmp_path / "log.txt").read_text()[-2000:]) from None
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert (tmp_path / "dpo" / "final" / "config.json").exists()
