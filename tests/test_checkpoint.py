"""A crash in the middle of a save (SIGKILL, not an exception) leaves the previous checkpoint loadable."""

import os
import signal
import subprocess
import sys
import textwrap

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
