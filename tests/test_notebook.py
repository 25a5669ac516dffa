"""docs/colab.ipynb: top to bottom on the CPU with the quickstart shrunk (its table and plots
inline, the GPT-2 study skipped in one line); its settings cell fed fake accelerators (float32
on a T4, bfloat16 on an H100, an A100, a TPU); the study's command through the docs' dry run;
the Drive cell without Drive."""
import base64
import os
import subprocess
import types

import nbformat
import pytest

from conftest import REPO, subprocess_env
from test_docs import dry_run
from test_quickstart import SHRINK

NOTEBOOK = os.path.join(REPO, "docs", "colab.ipynb")
GIB = 2**30


def _gpu(kind, gib, capability):
  return {"platform": "gpu", "device_kind": kind, "memory": int(gib * GIB),
          "compute_capability": capability}


T4 = _gpu("Tesla T4", 11.1, "7.5")
L4 = _gpu("NVIDIA L4", 16.6, "8.9")
H100 = _gpu("NVIDIA H100 80GB HBM3", 59.3, "9.0")
A100_40 = _gpu("NVIDIA A100-SXM4-40GB", 29.6, "8.0")
A100_80 = _gpu("NVIDIA A100-SXM4-80GB", 59.3, "8.0")
V5E = {"platform": "tpu", "device_kind": "TPU v5 lite", "memory": int(15.75 * GIB)}
CPU = {"platform": "cpu", "device_kind": "cpu", "memory": None}


def _cell(marker):
  """The source of the one code cell holding `marker`."""
  cells = nbformat.read(NOTEBOOK, as_version=4).cells
  [source] = [c.source for c in cells if c.cell_type == "code" and marker in c.source]
  return source


def _exec(marker, **names):
  """The names one cell defines, run alone with `names` as the earlier cells' globals."""
  scope = dict(names)
  exec(_cell(marker), scope)  # pylint: disable=exec-used
  return scope


def test_the_settings_cell_picks_the_dtype_and_batch_from_the_devices():
  pick = _exec("def pick_settings(")["pick_settings"]
  t4 = pick([T4])
  assert (t4["dtype"], t4["batch"], t4["grad_accum"]) == ("float32", 2, 4)
  assert "no bfloat16" in t4["message"] and "no fit-check target" in t4["message"]
  assert pick([dict(T4, compute_capability=None)])["dtype"] == "float32"  # by name alone
  assert (pick([L4])["dtype"], pick([L4])["batch"]) == ("bfloat16", 4)
  for device in (H100, A100_40, A100_80, V5E, dict(V5E, device_kind="TPU v2")):
    assert pick([device])["dtype"] == "bfloat16", device
  tpu8 = pick([dict(V5E)] * 8)
  assert (tpu8["batch"], tpu8["grad_accum"]) == (8, 1)  # one sequence per chip
  cpu = pick([CPU])
  assert cpu["dtype"] is None and pick([])["dtype"] is None
  assert "\n" not in cpu["message"] and "GPT-2 study is skipped" in cpu["message"]


def test_the_fit_check_chooses_the_batch_where_it_has_a_target():
  pick = _exec("def pick_settings(")["pick_settings"]
  calls = []

  def fits(topology, dtype, batch):
    calls.append((topology, dtype, batch))
    return batch <= 4

  s = pick([H100], fits=fits)
  assert (s["dtype"], s["batch"], s["grad_accum"]) == ("bfloat16", 4, 2)
  assert calls == [("h100:1", "bfloat16", 8), ("h100:1", "bfloat16", 4)]
  assert "the fit check for h100:1 says 4 at once fit" in s["message"]
  calls.clear()
  pick([A100_40], fits=fits), pick([A100_80], fits=fits), pick([V5E] * 4, fits=fits)
  assert [c[0] for c in calls] == ["a100-40:1", "a100-40:1", "a100-80:1", "a100-80:1",
                                   "v5e:2x2", "v5e:2x2"]
  calls.clear()
  assert pick([T4], fits=fits)["batch"] == 2 and not calls  # no target: fixed, never compiled
  s = pick([H100], fits=lambda *_: None)  # no verdict (no CUDA plugin, say): fixed
  assert s["batch"] == 4 and "no verdict" in s["message"]


def test_the_study_command_passes_the_docs_dry_run():
  cell = _exec("def pick_settings(")
  for device in (T4, H100):
    flags = cell["study_flags"](cell["pick_settings"]([device]))
    command = " ".join(["python -m blockprune_jax.main", f"--config={cell['STUDY']}",
                        "--workdir=runs/alloc_study", *flags])
    assert dry_run(command) == 24  # 7 allocations x 3 seeds, 3 dense controls: as the notebook says
  cell["CHECKPOINTS_INSIDE_RUNS"] = True
  assert not any("checkpoint" in f for f in cell["study_flags"](cell["pick_settings"]([H100])))


@pytest.mark.slow  # a subprocess
def test_the_fit_check_command_reaches_bench_aot():
  cell = _exec("def pick_settings(", ROOT=REPO, ENV=subprocess_env())
  done = []
  cell["subprocess"] = types.SimpleNamespace(
      run=lambda *a, **k: done.append(subprocess.run(*a, **k)) or done[-1])
  # This environment has no CUDA plugin: bench aot gets as far as saying so; no verdict.
  assert cell["fits"]("h100:1", "bfloat16", 8) is None
  assert "compiling for h100 needs JAX's CUDA plugin" in done[0].stderr


def test_without_drive_the_study_workdir_is_local_and_one_line_says_so(tmp_path, capsys):
  t4 = {"dtype": "float32", "batch": 2, "grad_accum": 4}
  cell = _exec("def study_workdir(", os=os, RUNS=str(tmp_path), SETTINGS=t4)
  assert cell["STUDY_DIR"] == str(tmp_path / "alloc_study_float32_2x4")  # named by its settings
  out = capsys.readouterr().out
  assert out.startswith("Google Drive is not mounted: results in ") and out.count("\n") == 1
  assert "STUDY_DIR" not in _exec("def study_workdir(", os=os, SETTINGS={"dtype": None})
  assert capsys.readouterr().out == ""


@pytest.mark.slow  # the quickstart, shrunk, in a kernel
def test_the_notebook_runs_top_to_bottom_on_the_cpu(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  # The kernel (python3: jupyter_client starts it with this interpreter) and the runs it starts
  # inherit this environment: one CPU device, this checkout, the quickstart shrunk.
  for key, value in subprocess_env(BLOCKPRUNE_NOTEBOOK_OVERRIDES=" ".join(SHRINK),
                                   BLOCKPRUNE_NOTEBOOK_RUNS=str(tmp_path / "runs"),
                                   BLOCKPRUNE_CACHE=str(tmp_path / "cache")).items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, kernel_name="python3", timeout=600,
                 resources={"metadata": {"path": os.path.join(REPO, "docs")}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  shown = [o.data for o in outputs if o.output_type == "display_data"]
  assert f"Using the checkout at {REPO}: nothing installed." in text
  assert "1 x cpu (cpu)" in text
  # The quickstart's console, then its comparison table and plots shown inline.
  assert "[12/12] prune.allocation=sensitivity__seed=2: validation ppl" in text
  table = [d["text/markdown"] for d in shown if "text/markdown" in d]
  assert len(table) == 1 and table[0].startswith("Mean ± std over seeds, per setting:")
  assert "| prune.allocation=sensitivity, prune.method=magnitude" in table[0]
  assert "- Sparsity 0.8 (" in table[0]
  images = [d["image/png"] for d in shown if "image/png" in d]
  plot = tmp_path / "runs" / "quickstart" / "ppl_vs_sparsity.png"
  assert len(images) >= 2 and base64.b64decode(images[0]) == plot.read_bytes()  # that one first
  # No accelerator: the GPT-2 section is one line, and nothing after it runs.
  section = text[text.index("No GPU or TPU"):]
  assert section.rstrip("\n") == ("No GPU or TPU on this runtime: the GPT-2 study is skipped "
                                  "(Runtime > Change runtime type picks one).")
  assert os.listdir(tmp_path / "runs") == ["quickstart"]
