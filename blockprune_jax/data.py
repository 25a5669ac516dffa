"""Text of a split and its token stream, cached on disk.

A split ("train", "validation" or "test") is one string (README, "What is computed, exactly"):
a file of data.text_dir, a Hugging Face dataset's rows joined with "\\n\\n" (as the Hugging Face
perplexity guide, Wanda and SparseGPT do), or a slice of `builtin_corpus()`. `token_stream`
caches its tokens as .npy, so a sweep of many runs tokenizes each split once.
"""
import hashlib
import json
import os
import re

from absl import logging
import numpy as np

from blockprune_jax import files
from blockprune_jax import tokenizer as tokenizer_lib
from blockprune_jax.errors import UserError, one_line

SPLITS = ("train", "validation", "test")
SOURCES = ("hf", "text", "builtin")
EVAL_SPLITS = ("validation", "test")

# Files looked for in data.text_dir, in order of preference: WikiText's own names (.raw, the
# untokenized text, before .tokens, which has <unk> and split hyphens), then plain names.
TEXT_FILES = {
    "train": ("wiki.train.raw", "wiki.train.tokens", "train.txt"),
    "validation": ("wiki.valid.raw", "wiki.valid.tokens", "validation.txt"),
    "test": ("wiki.test.raw", "wiki.test.tokens", "test.txt"),
}
_TEXT_DIR = "a folder with wiki.{train,valid,test}.{raw,tokens} or {train,validation,test}.txt"

_CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes
_PIECE_CHARS = 1 << 20  # the train split is tokenized in pieces of about 1 MB of text
_PIECES_PER_CALL = 16  # pieces per tokenizer call (the Rust side runs them in parallel)


def _check_split(split):
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}: splits are {', '.join(SPLITS)} (check eval.splits)")


def _source(data_cfg) -> str:
  source = data_cfg.get("source", "")
  if source not in SOURCES:
    raise UserError(f"unknown data.source={source!r}: use one of {', '.join(SOURCES)}")
  return source


def _builtin_text():
  """All pydoc topics in sorted order, one blank line between topics."""
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("this Python has no pydoc_data (needed by data.source=builtin): use "
                    "--config.data.source=text --config.data.text_dir=DIR") from e
  return "\n\n".join(topics[name].strip("\n") for name in sorted(topics))


def _paragraph_cut(text, at):
  """(end, start): the first paragraph break (a run of >= 2 newlines) at or after `at`."""
  m = re.compile(r"\n\n+").search(text, at)
  if m is None:
    raise ValueError("no paragraph break after the requested position")
  return m.start(), m.end()


def builtin_corpus() -> dict[str, str]:
  """{"train", "validation", "test": str}: English prose that ships with every Python (the text
  behind `help("if")`), cut at the first paragraph breaks after 80 % and 90 % of its characters.
  Python releases change it, hence `token_stream`'s cache key is a hash of the text."""
  text = _builtin_text()
  train_end, val_start = _paragraph_cut(text, int(0.8 * len(text)))
  val_end, test_start = _paragraph_cut(text, int(0.9 * len(text)))
  return {"train": text[:train_end], "validation": text[val_start:val_end],
          "test": text[test_start:]}


def _text_file(data_cfg, split):
  """The path of `split`'s file in data.text_dir (the first of TEXT_FILES present)."""
  text_dir = data_cfg.get("text_dir", "")
  if not text_dir:
    raise UserError(f"data.source=text needs data.text_dir: pass --config.data.text_dir=DIR, "
                    f"{_TEXT_DIR}")
  path = os.path.abspath(os.path.expanduser(text_dir))
  if not os.path.isdir(path):
    raise UserError(f"data.text_dir={text_dir!r} is not a directory: point "
                    f"--config.data.text_dir at {_TEXT_DIR}")
  for name in TEXT_FILES[split]:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise UserError(f"no {split} file in data.text_dir={path}: expected one of "
                  f"{', '.join(TEXT_FILES[split])}")


def _hf_text(data_cfg, split):
  hf_path, hf_name = data_cfg.get("hf_path", ""), data_cfg.get("hf_name", "")
  hint = f"data.hf_path={hf_path!r} data.hf_name={hf_name!r}, split {split!r}"
  try:
    import datasets  # pylint: disable=g-import-not-at-top
    ds = datasets.load_dataset(hf_path, hf_name or None, split=split)
  except Exception as e:  # pylint: disable=broad-except
    # No network, unknown dataset or config, missing split: all fixed by the user.
    raise UserError(f"could not load {hint} ({one_line(e)}); offline, pass "
                    "--config.data.source=builtin or --config.data.source=text "
                    "--config.data.text_dir=DIR") from e
  columns = list(ds.column_names)
  column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
  if column is None:
    raise UserError(f"{hint} has no 'text' column (columns: {columns}): choose a text dataset "
                    "for data.hf_path / data.hf_name")
  return "\n\n".join(ds[column])


def split_text(data_cfg, split: str) -> str:
  """The text of one split (`data` keys source, text_dir, hf_path, hf_name) as one string."""
  _check_split(split)
  source = _source(data_cfg)
  if source == "text":
    path = _text_file(data_cfg, split)
    try:  # newline="": the split is the file's contents, line endings included
      with open(path, encoding="utf-8", newline="") as f:
        return f.read()
    except UnicodeDecodeError as e:
      raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it "
                      "as UTF-8 or set --config.data.text_dir to another folder") from e
  if source == "hf":
    return _hf_text(data_cfg, split)
  return builtin_corpus()[split]


def cache_root(data_cfg) -> str:
  """data.cache_dir, else $BLOCKPRUNE_CACHE, else ~/.cache/blockprune_jax."""
  root = (data_cfg.get("cache_dir", "") or os.environ.get("BLOCKPRUNE_CACHE", "")
          or os.path.join("~", ".cache", "blockprune_jax"))
  return os.path.abspath(os.path.expanduser(root))


def _source_identity(data_cfg, split):
  """What the split's text depends on (cheap: it reads no text except the small builtin one)."""
  source = _source(data_cfg)
  if source == "text":
    path = _text_file(data_cfg, split)
    st = os.stat(path)
    return {"source": "text", "file": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  if source == "hf":
    return {"source": "hf", "hf_path": data_cfg.get("hf_path", ""),
            "hf_name": data_cfg.get("hf_name", "")}
  digest = hashlib.sha256(builtin_corpus()[split].encode("utf-8")).hexdigest()
  return {"source": "builtin", "sha256": digest}


def cache_path(data_cfg, split: str, tok) -> str:
  """Where `token_stream` keeps the tokens of `split` (the file may not exist yet)."""
  _check_split(split)
  key = {"format": _CACHE_FORMAT, "split": split, "tokenizer": tokenizer_lib.tokenizer_fingerprint(tok),
         **_source_identity(data_cfg, split)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
  return os.path.join(cache_root(data_cfg), f"tokens-{key['source']}-{split}-{digest}.npy")


# A cut after "\n" that GPT-2's byte-level pre-tokenizer (regex `...|\s+(?!\S)|\s+`) also makes in
# the whole string: before " X" (any whitespace run ends before the space, which then joins X), or
# before X when the "\n" alone separates it from the previous non-space character. Tokens of the
# pieces, concatenated, then equal the tokens of the whole text (tests check this).
_SAFE_CUT = re.compile(r"(?<=\n)(?= \S)|(?<=\S\n)(?=\S)")


def text_pieces(text: str, piece_chars: int = _PIECE_CHARS) -> list[str]:
  """Consecutive pieces of about `piece_chars` characters, cut at _SAFE_CUT line breaks."""
  pieces, start = [], 0
  while len(text) - start > piece_chars:
    m = _SAFE_CUT.search(text, start + piece_chars)
    if m is None:
      break
    pieces.append(text[start:m.start()])
    start = m.start()
  pieces.append(text[start:])
  return pieces


def _tokenize(text, split, tok):
  if split in EVAL_SPLITS:
    # One string, so the token count is exactly the tokenizer's (README, "What is computed, exactly").
    return tokenizer_lib.encode(tok, text)
  # Train: many pieces per call are much faster on large corpora (the tokenizer parallelizes a batch)
  # and need less memory; for GPT-2 the tokens are the same (see _SAFE_CUT).
  pieces = text_pieces(text)
  arrays = [a for i in range(0, len(pieces), _PIECES_PER_CALL)
            for a in tokenizer_lib.encode_many(tok, pieces[i:i + _PIECES_PER_CALL])]
  return np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)


def token_stream(data_cfg, split: str, tok) -> np.ndarray:
  """The int32 tokens of one split (no special tokens), tokenized once, then read from the
  cache in `cache_root` (written atomically: concurrent or killed runs leave no bad file)."""
  path = cache_path(data_cfg, split, tok)
  if os.path.isfile(path):
    try:
      return np.load(path)
    except (OSError, ValueError, EOFError) as e:
      logging.warning("unreadable token cache %s (%s); tokenizing again", path, e)
  text = split_text(data_cfg, split)
  tokens = _tokenize(text, split, tok)
  logging.info("%s split: %d characters -> %d tokens, cached in %s", split, len(text),
               tokens.size, path)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_path(path, "the token cache") as tmp, open(tmp, "wb") as f:
      np.save(f, tokens)
  except OSError as e:
    raise UserError(f"cannot write the token cache {path} ({one_line(e)}): set "
                    "--config.data.cache_dir=DIR (or $BLOCKPRUNE_CACHE) to a writable folder") from e
  return tokens


def train_sequences(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping sequences [n, seq_len + 1]: inputs are [:, :-1], labels [:, 1:]."""
  n = (len(stream) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return stream[idx]


def batch_at(sequences, position: int, batch_size: int, seed: int):
  """The `position`-th batch of an endless, per-epoch shuffled pass over `sequences`: a pure
  function of (position, seed), so a resumed run sees exactly the batches it would have."""
  per_epoch = len(sequences) // batch_size
  epoch, i = divmod(position, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(sequences))
  return sequences[order[i * batch_size:(i + 1) * batch_size]]


def step_batch(sequences, step: int, accum: int, batch_size: int, seed: int) -> np.ndarray:
  """[accum, B, T + 1]: the micro-batches of optimizer step `step` (see batch_at)."""
  return np.stack([batch_at(sequences, step * accum + a, batch_size, seed) for a in range(accum)])
