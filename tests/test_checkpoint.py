"""A crash in the middle of a save (SIGKILL, not an exception) leaves the previous checkpoint loadable."""

import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tether.checkpoint import Checkpointer
from tether.config import EngineConfig, OptimConfig
from tether.engine.local import LocalEngine
from tether.models import load_causal_lm

SCRIPT = textwrap.dedent('''
    import sys, time, torch
    from tether.checkpoint import Checkpointer, save_model_folder
    from tether.config import EngineConfig, OptimConfig
    from tether.engine.local import LocalEngine
    from tether.models import load_causal_lm
    model_dir, out, what = sys.argv[1], sys.argv[2], sys.argv[3]
    eng = LocalEngine(load_causal_lm(model_dir), EngineConfig(), OptimConfig())
    ck = Checkpointer(out)
    ck.save(1, {"policy": eng}, {"marker": 1}, {})
    save_model_folder(eng.model, out + "/final")
    print("saved", flush=True)
    with torch.no_grad():
        for p in eng.model.parameters():
            p.add_(1.0)
    real = torch.save
    def slow_save(*a, **k):  # the weights are on disk, the optimizer state is half-written
        real(*a, **k)
        print("mid-save", flush=True)
        time.sleep(60)
    torch.save = slow_save
    if what == "checkpoint":
        ck.save(2, {"policy": eng}, {"marker": 2}, {})
    else:
        import safetensors.torch as st
        real_sf = st.save_file
        def slow_sf(*a, **k):
            real_sf(*a, **k)
            print("mid-save", flush=True)
            time.sleep(60)
        st.save_file = slow_sf
        import transformers.modeling_utils as mu
        mu.safe_save_file = slow_sf
        save_model_folder(eng.model, out + "/final")
    print("finished", flush=True)
''')


def _kill_mid_save(tiny_gpt2, out, what):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_gpt2), str(out), what], stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "mid-save":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert lines[-2:] == ["saved", "mid-save"], lines
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_checkpoint_keeps_previous(tiny_gpt2, tmp_path):
    _kill_mid_save(tiny_gpt2, tmp_path, "checkpoint")
    ck = Checkpointer(tmp_path)
    assert ck.latest().name == "step_1"
    assert list((tmp_path / "checkpoints").glob("step_2.tmp-*")), "the interrupted save left its temporary folder"
    eng = LocalEngine(load_causal_lm(tiny_gpt2), EngineConfig(), OptimConfig())
    fresh = {k: v.clone() for k, v in eng.model.state_dict().items()}
    state = ck.load({"policy": eng})
    assert state["marker"] == 1
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, fresh[k]), k  # step 1 weights, not the +1 of the killed save
    # the next save clears the debris
    ck.save(3, {"policy": eng}, {}, {})
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_kill_during_final_model_save_keeps_previous(tiny_gpt2, tmp_path):
    _kill_mid_save(tiny_gpt2, tmp_path, "final")
    model = load_causal_lm(tmp_path / "final")
    ref = load_causal_lm(tiny_gpt2)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("limit_kb", [64, 256])  # 64: the weights' safetensors fails; 256: the optimizer's torch.save
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_debris(tiny_gpt2, tmp_path, limit_kb):
    """A real failed write: RLIMIT_FSIZE makes the kernel refuse writes past the limit (EFBIG), the way a
    full disk refuses them. The save fails with the checkpoint's path and the disk's free space in one
    line, its half-written folder is gone (on a full disk it would hold the space), and the previous
    checkpoint still loads."""
    from tether.losses import sft_loss
    from tether.models import causal_logprobs
    from tether.types import SFTBatch

    eng = LocalEngine(load_causal_lm(tiny_gpt2), EngineConfig(), OptimConfig())
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    eng.train_step(SFTBatch(ids, torch.ones_like(ids), torch.ones(2, 8)), lambda m, b: sft_loss(causal_logprobs(m, b.input_ids, b.attention_mask)[0], b.loss_mask, 16.0))
    ck = Checkpointer(tmp_path)
    ck.save(1, {"policy": eng}, {"marker": 1}, {})
    assert (tmp_path / "checkpoints" / "step_1" / "model_policy" / "model.safetensors").stat().st_size < 256 << 10 < (tmp_path / "checkpoints" / "step_1" / "optim_policy.pt").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb << 10, hard))
    try:
        with pytest.raises(OSError) as info:
            ck.save(2, {"policy": eng}, {"marker": 2}, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoints" / "step_2") in message and "MB free" in message, message
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))
    assert ck.latest().name == "step_1" and ck.load({"policy": eng})["marker"] == 1


def test_a_full_disk_during_a_final_model_save_leaves_the_previous_one_and_no_debris(tiny_gpt2, tmp_path):
    """The same real failed write for the final model folder (every engine's save_model) and for a single
    file (the DPO reference cache): one line naming it, no temporary left, the previous version intact."""
    from tether.checkpoint import atomic_torch_save, save_model_folder

    model = load_causal_lm(tiny_gpt2)
    save_model_folder(model, tmp_path / "final")
    atomic_torch_save({"x": torch.zeros(10)}, tmp_path / "cache.pt")
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(OSError, match=f"^model folder {tmp_path / 'final'} could not be written \\(\\d+ MB free on its disk\\): "):
            save_model_folder(model, tmp_path / "final")
        with pytest.raises(OSError, match=f"^file {tmp_path / 'cache.pt'} could not be written"):
            atomic_torch_save({"x": torch.zeros(1 << 16)}, tmp_path / "cache.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt", "final"]
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before and torch.load(tmp_path / "cache.pt")["x"].shape == (10,)
