"""Hugging Face GPT-2 checkpoints in and out: a name mapping plus shape checks.

The files (safetensors, or a torch .bin) are read and written as plain tensors, with no model
class. HF's Conv1D stores weights as [in, out], the layout of a Flax Dense kernel: no transposes.
"""
import json
import os
import re

import numpy as np

from blockprune_jax import files
from blockprune_jax import model as model_lib
from blockprune_jax import trees
from blockprune_jax.errors import UserError, one_line

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json")
# Checked before use: a truncated file fails naming itself, not deep inside transformers.
_JSON_FILES = ("config.json", "model.safetensors.index.json",
               *(n for n in _TOKENIZER_FILES if n.endswith(".json")))
_BLOCK_TENSOR = re.compile(
    r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_HF_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def resolve_dir(name_or_path: str, key: str = "model.name_or_path") -> str:
  """A local HF directory for `name_or_path` (the config key `key`): the directory itself, a
  workdir's `export/`, or a hub snapshot (downloaded once, then cached by huggingface_hub)."""
  if os.path.isdir(name_or_path):
    for d in (name_or_path, os.path.join(name_or_path, "export")):
      if os.path.isfile(os.path.join(d, "config.json")):
        check_json_files(d)
        return d
    raise UserError(f"{key}={name_or_path!r} is a directory without config.json "
                    "(nor export/config.json): point it at a Hugging Face GPT-2 directory")
  if os.path.lexists(name_or_path):
    raise UserError(f"{key}={name_or_path!r} is a file, not a directory: point it at a Hugging "
                    "Face GPT-2 directory (config.json + model.safetensors)")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    d = snapshot_download(name_or_path, allow_patterns=[
        "config.json", "model.safetensors", "model.safetensors.index.json",
        "model-*.safetensors", "pytorch_model.bin", *_TOKENIZER_FILES])
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f"{key}={name_or_path!r}: not a local directory and the Hugging Face hub "
        f"could not provide it ({type(e).__name__}). Offline, pass a local HF directory or "
        "--config.model.init=scratch") from None
  check_json_files(d)
  return d


def check_json_files(ckpt_dir: str) -> None:
  """UserError naming the first JSON file of `ckpt_dir` that is unreadable or not JSON."""
  for name in _JSON_FILES:
    _read_json(os.path.join(ckpt_dir, name), required=name == "config.json")


def _read_json(path: str, required: bool = True):
  """The JSON object in `path` (None if absent and not required); UserError naming the file."""
  try:
    obj = files.load_json(path)
  except ValueError as e:
    raise UserError(f"{path} is unreadable ({e}): the checkpoint directory is damaged; "
                    "export or download it again") from None
  if obj is None and required:
    raise UserError(f"{path}: no such file; point the key at a complete Hugging Face directory")
  return obj


def load_config(ckpt_dir: str, **overrides) -> model_lib.GPT2Config:
  """GPT2Config from an HF config.json (dtype / dropout / attention come from overrides)."""
  path = os.path.join(ckpt_dir, "config.json")
  hf = _read_json(path)
  missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
             if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool) or hf[k] < 1]
  if missing:
    raise UserError(f"{path}: {missing[0]} is missing or not a positive integer "
                    f"({hf.get(missing[0])!r}); is this a GPT-2 checkpoint?")
  if hf.get("model_type", "gpt2") != "gpt2":
    raise UserError(f"{ckpt_dir}/config.json: model_type={hf.get('model_type')!r}, "
                    "only GPT-2 checkpoints are supported")
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise UserError(f"{ckpt_dir}/config.json: activation_function={act!r}; this port uses "
                    "GPT-2's tanh GELU (gelu_new)")
  n_inner = hf.get("n_inner") or 4 * hf["n_embd"]
  widths = None if n_inner == 4 * hf["n_embd"] else (n_inner,) * hf["n_layer"]
  return model_lib.GPT2Config(
      vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
      n_layer=hf["n_layer"], n_head=hf["n_head"],
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), mlp_widths=widths, **overrides)


def _read_tensors(ckpt_dir: str) -> dict:
  """All tensors of a checkpoint as float32 numpy arrays, keyed by HF name."""
  st = os.path.join(ckpt_dir, "model.safetensors")
  index = st + ".index.json"
  binf = os.path.join(ckpt_dir, "pytorch_model.bin")
  if os.path.isfile(st) or os.path.isfile(index):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    shards = [st] if os.path.isfile(st) else _shard_files(ckpt_dir, index)
    return {k: np.asarray(v, np.float32)
            for fn in shards for k, v in _load_weights(fn, load_file).items()}
  if os.path.isfile(binf):
    import torch  # pylint: disable=import-outside-toplevel
    sd = _load_weights(binf, lambda fn: torch.load(fn, map_location="cpu", weights_only=True))
    return {k: v.float().numpy() for k, v in sd.items()}
  raise UserError(f"{ckpt_dir}: no model.safetensors or pytorch_model.bin found")


def _shard_files(ckpt_dir: str, index: str) -> list:
  """The safetensors shards an index names (each must exist)."""
  weight_map = (_read_json(index) or {}).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index} has no weight_map: the checkpoint directory is damaged")
  shards = sorted({os.path.join(ckpt_dir, str(v)) for v in weight_map.values()})
  for fn in shards:
    if not os.path.isfile(fn):
      raise UserError(f"{fn} (named in {index}) is missing: download the checkpoint again")
  return shards


def _load_weights(path: str, load):
  """load(path); a truncated or damaged file (a killed download, a full disk) is one line."""
  try:
    return load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path} is unreadable ({one_line(e, 200)}): the file is truncated "
                    "or damaged; export or download it again") from None


def _our_path(hf_name: str):
  """'transformer.h.3.mlp.c_fc.weight' -> ('h_3', 'mlp', 'c_fc', 'kernel'); None to skip."""
  name = hf_name.removeprefix("transformer.")
  if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
    return None  # causal-mask buffers; the LM head is tied to wte
  if name in ("wte.weight", "wpe.weight"):
    return (name.split(".")[0], "embedding")
  if name in ("ln_f.weight", "ln_f.bias"):
    top, module, leaf = (), *name.split(".")
  elif m := _BLOCK_TENSOR.fullmatch(name):
    top, module, leaf = (f"h_{m[1]}",), m[2], m[3]
  else:
    raise UserError(f"unexpected tensor {hf_name!r} in checkpoint: not a GPT-2 parameter")
  if leaf == "weight":
    leaf = "scale" if module.startswith("ln") else "kernel"
  return (*top, *module.split("."), leaf)


def load_params(ckpt_dir: str, cfg: model_lib.GPT2Config) -> dict:
  """Reads an HF GPT-2 checkpoint into our nested-dict parameter tree (float32 numpy)."""
  expected = model_lib.init_shapes(cfg)
  params, seen = {}, set()
  for hf_name, arr in _read_tensors(ckpt_dir).items():
    path = _our_path(hf_name)
    if path is None:
      continue
    want = trees.get_path(expected, path)
    if want is None or tuple(want.shape) != arr.shape:
      raise UserError(f"{ckpt_dir}: tensor {hf_name} has shape {arr.shape}, the config.json "
                      f"implies {None if want is None else tuple(want.shape)}")
    trees.set_path(params, path, arr)
    seen.add(path)
  missing = [p for p in trees.leaf_paths(expected) if p not in seen]
  if missing:
    raise UserError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensors, e.g. {'.'.join(missing[0])}")
  return params


def export(params, cfg: model_lib.GPT2Config, out_dir: str, tokenizer=None) -> str:
  """config.json + model.safetensors (+ tokenizer files) for GPT2LMHeadModel.from_pretrained,
  dense only; written whole or not at all, never over different files (files.atomic_directory)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors = {}
  for path in trees.leaf_paths(params):
    leaf = np.asarray(trees.get_path(params, path), np.float32)
    tensors[_hf_name(path)] = np.ascontiguousarray(leaf)
  n_inner = cfg.mlp_width(0)
  if cfg.mlp_widths and len(set(cfg.mlp_widths)) > 1:
    raise ValueError("export needs one MLP width for all layers; export the masked dense model")
  eos = getattr(tokenizer, "eos_token_id", None)
  eos = 50256 if eos is None else eos
  hf_config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
      "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
      "n_inner": None if n_inner == 4 * cfg.n_embd else n_inner,
      "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
      "initializer_range": 0.02, "bos_token_id": eos, "eos_token_id": eos,
      "tie_word_embeddings": True, "torch_dtype": "float32",
  }
  with files.atomic_directory(out_dir) as tmp:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
  return out_dir


def _hf_name(path) -> str:
  """_our_path's inverse."""
  if path[0] in ("wte", "wpe"):
    return f"transformer.{path[0]}.weight"
  top = ("h", path[0].removeprefix("h_")) if path[0] != "ln_f" else ("ln_f",)
  return ".".join(("transformer", *top, *path[1:-1], _HF_LEAF[path[-1]]))


def load_teacher(config, model_cfg):
  """(teacher params, teacher GPT2Config) for distillation (distill.teacher), or (None, None)."""
  if not config.distill.teacher:
    return None, None
  d = resolve_dir(config.distill.teacher, key="distill.teacher")
  t_cfg = load_config(d, dtype=model_cfg.dtype, dropout=0.0, attention=model_cfg.attention)
  if t_cfg.vocab_size != model_cfg.vocab_size:
    raise UserError(f"distill.teacher={config.distill.teacher!r} has vocab {t_cfg.vocab_size}, "
                    f"the student {model_cfg.vocab_size}")
  return load_params(d, t_cfg), t_cfg
