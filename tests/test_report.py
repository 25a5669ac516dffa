"""The report on pandas: the same files and numbers as before, plus one-shot / control / paired.

Golden files: tests/data/report/golden/<case>/ hold report.csv, report.md, report_seeds.csv and the
names of the plots that the report code *before* the pandas rewrite wrote for the fixture runs in
tests/data/report/sweeps (see tests/data/report/README.md). The new code must write them byte for
byte; the only difference allowed is the new "Paired comparison" section of report.md (the
fixtures hold generated allocations over 3 seeds), which is cut out before comparing and checked
on its own in test_paired_comparison_matches_a_hand_computation.
"""
import csv
import json
import math
import os
import re
import shutil

import pytest

from blockprune_jax import report

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "report")
CASES = {"all": ["sweeps"], "multi": ["sweeps/scan", "sweeps/odd"]}
T975_DF2 = 4.302653  # two-sided 95 % Student-t quantile for 2 degrees of freedom (tables)


def _without_paired(md: str) -> str:
  """report.md minus the new section: from its heading to the next section (or the end)."""
  return re.sub(r"\n## Paired comparison\n.*?(?=\n## |\Z)", "", md, flags=re.S)


def _rules(md: str) -> str:
  """Markdown tables' header rules as `|---|---|`: DataFrame.to_markdown draws them as wide as
  the column (the only change from the golden report.md it may make)."""
  return re.sub(r"^\|[-|]+\|$", lambda m: re.sub("-+", "---", m.group()), md, flags=re.M)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_files_and_numbers_as_before(case, tmp_path, monkeypatch):
  monkeypatch.chdir(DATA)  # relative sources: report.md's title names them as given
  written = report.write_report(str(tmp_path), CASES[case])
  gold = os.path.join(DATA, "golden", case)
  if os.environ.get("REGEN_REPORT_GOLDEN"):  # only after a deliberate change of the outputs
    for name in ("report.csv", "report.md", "report_seeds.csv"):
      if os.path.exists(tmp_path / name):
        shutil.copy(tmp_path / name, gold)
  for name in ("report.csv", "report_seeds.csv"):
    assert os.path.exists(os.path.join(gold, name)) == os.path.exists(tmp_path / name), name
    if os.path.exists(tmp_path / name):
      with open(tmp_path / name, "rb") as new, open(os.path.join(gold, name), "rb") as old:
        assert new.read() == old.read(), name  # full-precision floats: the very same numbers
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  assert _rules(_without_paired(md)) == open(os.path.join(gold, "report.md"),
                                             encoding="utf-8").read()
  assert ("## Paired comparison" in md) == (case == "all")
  plots = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
  assert plots == open(os.path.join(gold, "plots.txt")).read().split()
  assert all(os.path.getsize(tmp_path / p) > 5000 for p in plots)
  assert sorted(os.path.basename(p) for k, p in written.items() if p.endswith(".png")) == plots
  assert written.table in md and written.table.startswith("| run | role |")


def test_public_helpers_still_take_rows(monkeypatch):
  monkeypatch.chdir(DATA)
  rows = report.collect(["sweeps"])
  assert len(rows) == 32 and rows[0]["run"] == "odd/collapsed"
  partial = next(r for r in rows if r["run"] == "odd/partial")
  assert partial["ppl_validation"] == 99.5 and partial["sparsity_overall"] is None
  diverged = next(r for r in rows if r["run"] == "odd/diverged")
  assert math.isinf(diverged["ppl_validation"]) and math.isnan(diverged["ppl_test"])
  assert [r["seed"] for r in rows if r["run"] == "odd/seed_only"] == [7]
  table = report.markdown_table(rows)
  assert table == report.markdown_table(report.frame(["sweeps"]))
  assert "| odd/diverged | experiment | magnitude | explicit |  | 0.9/0.9/0.9 |" in table
  groups = report.seed_groups(rows)
  assert [g["allocation"] for g in groups] == ["exponential", "linear", "uniform", "explicit"]
  assert groups[-1]["n"] == 2 and groups[-1]["seeds"] == "0/1" and groups[-1]["target"] is None
  assert [os.path.basename(d) for _, d in report.find_results(["sweeps/scan"])][:2] == \
      ["dense", "dense_nofinetune"]


# ----------------------------------------------------------------------------------------------
# Small sweeps written by the tests
# ----------------------------------------------------------------------------------------------


def write_run(root, name, seed, allocation="uniform", ppl=None, oneshot=None, role="experiment",
              method="magnitude", target=0.5, lr=5e-5, role_in_results=True):
  """A results.json in the pipeline's schema, trimmed to what the report reads."""
  cfg = {"seed": seed, "role": role, "train": {"steps": 20, "learning_rate": lr},
         "prune": {"method": method, "allocation": allocation, "target": target, "ratios": []}}
  res = {"config": cfg, "perplexity": ppl,
         "pruning": {"method": method, "allocation": allocation},
         "sparsity": {"overall": 0.0 if method == "none" else target},
         "train": {"steps": 20, "final_loss": 3.0}}
  if role_in_results:
    res["role"] = role
  if oneshot is not None:
    res["oneshot"] = {"perplexity": oneshot}
  os.makedirs(root / name)
  (root / name / "results.json").write_text(json.dumps(res))


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_oneshot_and_delta_columns_with_a_dense_control(tmp_path):
  root = tmp_path / "ctl"
  write_run(root, "control_s0", 0, method="none", role="control", ppl={"validation": 20.0,
                                                                      "test": 19.0})
  # The second control says so only in its config (results.json without a role).
  write_run(root, "control_s1", 1, method="none", role="control", role_in_results=False,
            ppl={"validation": 21.0, "test": 20.0})
  for seed, v in enumerate((25.0, 26.5, 24.0)):
    write_run(root, f"uniform_s{seed}", seed, ppl={"validation": v, "test": v - 1},
              oneshot={"validation": v + 30, "test": v + 29})
  write_run(root, "base", 0, method="none", role="base", ppl={"validation": 40.0, "test": 39.0})

  written = report.write_report(str(root))
  table = {r["run"]: r for r in read_csv(written["csv"])}
  head = list(read_csv(written["csv"])[0])
  assert head[head.index("ppl_validation"):head.index("seed")] == [
      "ppl_validation", "ppl_test", "oneshot_validation", "oneshot_test", "delta_validation",
      "delta_test"]
  assert float(table["uniform_s0"]["oneshot_validation"]) == 55.0
  assert float(table["uniform_s2"]["oneshot_test"]) == 53.0
  assert table["control_s0"]["oneshot_validation"] == ""
  # Same seed -> that control; seed 2 has none -> the mean over controls (20.5 / 19.5).
  assert float(table["uniform_s0"]["delta_validation"]) == pytest.approx(25.0 - 20.0)
  assert float(table["uniform_s1"]["delta_validation"]) == pytest.approx(26.5 - 21.0)
  assert float(table["uniform_s2"]["delta_validation"]) == pytest.approx(24.0 - 20.5)
  assert float(table["uniform_s2"]["delta_test"]) == pytest.approx(23.0 - 19.5)
  assert table["control_s1"]["role"] == "control"
  assert table["control_s0"]["delta_validation"] == table["control_s1"]["delta_test"] == "0.0"
  assert table["base"]["delta_validation"] == ""  # the from-scratch base is another model

  md = open(written["md"], encoding="utf-8").read()
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  assert "one-shot ppl validation" in lines[0] and "Δ ppl validation" in lines[0]
  assert lines[1].startswith("| control_s0 | control |")  # the control rows come first
  assert lines[2].startswith("| control_s1 | control |")
  assert "| 26.50 | 25.50 | 56.50 | 55.50 | 5.50 | 5.50 | 1 |" in lines[lines.index(
      next(l for l in lines if l.startswith("| uniform_s1 ")))]
  assert written.table in md and written.table.splitlines()[2].startswith("| control_s0 ")


def test_paired_comparison_matches_a_hand_computation(tmp_path):
  root = tmp_path / "pairs"
  linear, uniform = [30.1, 30.5, 29.9], [30.6, 30.8, 30.4]  # fine-tuned validation perplexity
  linear_os, uniform_os = [45.0, 47.0, 44.0], [46.0, 45.5, 44.5]  # one-shot
  for seed in range(3):
    write_run(root, f"linear_s{seed}", seed, "linear", ppl={"validation": linear[seed]},
              oneshot={"validation": linear_os[seed]})
    write_run(root, f"uniform_s{seed}", seed, "uniform", ppl={"validation": uniform[seed]},
              oneshot={"validation": uniform_os[seed]})
  # Not part of the pairs: another learning rate, another sparsity, one seed only.
  write_run(root, "uniform_lr", 0, "uniform", ppl={"validation": 99.0}, lr=1e-4)
  write_run(root, "linear_lr", 0, "linear", ppl={"validation": 98.0}, lr=1e-4)
  write_run(root, "owl_s0", 0, "owl", ppl={"validation": 10.0})
  write_run(root, "uniform_t7", 0, "uniform", ppl={"validation": 50.0}, target=0.7)

  def hand(a, b):
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = T975_DF2 * std / math.sqrt(3)
    return mean, std, mean - half, mean + half

  written = report.write_report(str(root))
  rows = read_csv(written["paired_csv"])
  assert [(r["stage"], r["allocation_a"], r["allocation_b"]) for r in rows] == [
      ("fine-tuned", "linear", "uniform"), ("one-shot", "linear", "uniform")]
  for row, (a, b), significant in ((rows[0], (linear, uniform), "True"),
                                   (rows[1], (linear_os, uniform_os), "False")):
    mean, std, low, high = hand(a, b)
    assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
    assert float(row["std"]) == pytest.approx(std, abs=1e-12)
    assert float(row["ci_low"]) == pytest.approx(low, abs=1e-5)
    assert float(row["ci_high"]) == pytest.approx(high, abs=1e-5)
    assert row["n"] == "3" and row["significant"] == significant
    assert (row["sparsity"], row["method"], row["train_steps"], row["split"], row["setting"]) \
        == ("0.5", "magnitude", "20", "validation", "train.learning_rate=5e-05")
  assert (round(hand(linear, uniform)[2], 2), round(hand(linear, uniform)[3], 2)) == (-0.72, -0.15)

  md = open(written["md"], encoding="utf-8").read()
  section = md[md.index("## Paired comparison"):]
  assert "| 0.5 | magnitude | 20 | fine-tuned | linear | uniform | 3 | -0.43 | -0.72 to -0.15 " \
         "| yes |" in section
  assert "| 0.5 | magnitude | 20 | one-shot | linear | uniform | 3 | 0.00 |" in section
  sentences = [l for l in section.splitlines() if l.startswith("- ")]
  assert sentences == [  # the learning rate tells this group from the (unpaired) lr=1e-4 one
      "- Sparsity 0.5 (magnitude, 20 train steps, train.learning_rate=5e-05): linear has the lowest fine-tuned validation "
      "perplexity (30.17, mean over 3 seeds); linear beats uniform by 0.43 validation perplexity "
      "(95 % CI 0.15 to 0.72, 3 seeds): significant."]


def test_broken_and_partial_results_do_not_stop_the_report(tmp_path, caplog):
  root = tmp_path / "mixed"
  for seed in range(2):
    write_run(root, f"good_s{seed}", seed, ppl={"validation": 30.0 + seed, "test": 29.0})
  bad = {"broken": "{not json", "empty": "", "a_list": "[1, 2]",
         "odd_types": json.dumps({"config": None, "perplexity": "oops", "pruning": [1],
                                  "sparsity": {"overall": "n/a", "per_block": [0.5, None]},
                                  "train": "none"}),
         "only_ppl": json.dumps({"perplexity": {"validation": 12.5}})}
  for name, text in bad.items():
    os.makedirs(root / name)
    (root / name / "results.json").write_text(text)

  written = report.write_report(str(root))
  table = {r["run"]: r for r in read_csv(written["csv"])}
  assert sorted(table) == ["good_s0", "good_s1", "odd_types", "only_ppl"]
  assert table["only_ppl"]["ppl_validation"] == "12.5" and table["only_ppl"]["method"] == ""
  assert all(v == "" for k, v in table["odd_types"].items() if k != "run")
  assert "seeds_csv" in written and "paired_csv" not in written  # one allocation only
  assert "| only_ppl |" in open(written["md"], encoding="utf-8").read()
  assert sum("skipping" in r.getMessage() for r in caplog.records) == 3
  assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no plot or section failed


def test_an_empty_directory_still_gives_the_tables(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("| run | role |") and "no results.json" in err
  assert read_csv(tmp_path / "report.csv") == []
  assert "0 runs." in open(tmp_path / "report.md", encoding="utf-8").read()
