"""The documentation stays short and connected: README.md fits in 250 lines and starts with the
two commands CI runs, and every link, repository path and `python -m blockprune_jax.X` module
named in README.md, docs/ and launch/ exists, so moving a file or renaming a section breaks a
test instead of a reader's click."""
import glob
import os
import re
import shlex

import pytest

from conftest import REPO

README_MAX_LINES = 250
INSTALL_AND_QUICKSTART = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r "
                          "requirements.txt -e . && python -m blockprune_jax.main "
                          "--config=configs/quickstart.py --workdir=runs/quickstart")
TEST_COMMAND = "python -m pytest -q"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A repository path in the text: starts at one of the top-level folders, not inside a longer path.
REPO_PATH = re.compile(r"(?<![\w./$-])((?:configs|launch|blockprune_jax|tests|docs)/[\w./-]*)")
MODULE = re.compile(r"python3? -m (blockprune_jax(?:\.\w+)+)")


def _docs():
  """README.md, docs/*.md and launch/'s files: every place a reader is told to look or run."""
  names = ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=REPO))
  names += sorted(glob.glob("launch/*", root_dir=REPO))
  return {n: open(os.path.join(REPO, n), encoding="utf-8").read() for n in names}


def _without_code_blocks(text):
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchor(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
  return text.replace(" ", "-")


def _anchors(markdown):
  return {_anchor(h) for h in re.findall(r"^#+ (.*)$", _without_code_blocks(markdown), re.M)}


def broken_links(name, text, root=REPO):
  """'name: target (why)' for each relative link in markdown `text` (file `name` under `root`)
  whose file is missing or whose #anchor names no heading of that file."""
  broken = []
  for target in LINK.findall(_without_code_blocks(text)):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(root, os.path.dirname(name), path)) if path else \
        os.path.join(root, name)
    if not os.path.exists(full):
      broken.append(f"{name}: {target} (no such file)")
    elif anchor and full.endswith(".md") and anchor not in _anchors(open(full).read()):
      broken.append(f"{name}: {target} (no such heading)")
  return broken


def test_readme_is_short_and_starts_with_the_two_commands():
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  lines = readme.splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
  first_block = readme.split("```")[1].splitlines()
  commands = [l for l in first_block if l and not l.startswith(("#", "bash"))]
  assert commands == [INSTALL_AND_QUICKSTART, TEST_COMMAND], commands
  # CI runs exactly what the README tells a newcomer to run.
  ci = [l for l in open(os.path.join(REPO, ".ci", "run")).read().splitlines() if l.strip()]
  assert ci[-1] == TEST_COMMAND


def test_the_link_check_finds_a_broken_link_and_a_missing_heading(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some section, here\n")
  text = ("[ok](docs/a.md) [ok](docs/a.md#some-section-here) [web](https://x.org/y)\n"
          "[gone](docs/b.md) [no heading](docs/a.md#other)\n```\n[code](not/checked)\n```\n")
  assert broken_links("README.md", text, root=str(tmp_path)) == [
      "README.md: docs/b.md (no such file)", "README.md: docs/a.md#other (no such heading)"]


def test_every_relative_link_points_to_an_existing_file_and_heading():
  broken = []
  for name, text in _docs().items():
    if name.endswith(".md"):
      broken += broken_links(name, text)
  assert not broken, "fix these links: " + "; ".join(broken)


def test_every_named_path_and_module_exists():
  missing = []
  for name, text in _docs().items():
    for path in REPO_PATH.findall(text):
      if not os.path.exists(os.path.join(REPO, path.rstrip("."))):
        missing.append(f"{name}: {path}")
    for module in MODULE.findall(text):
      base = os.path.join(REPO, *module.split("."))
      if not (os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))):
        missing.append(f"{name}: python -m {module}")
  assert not missing, "named in the docs but not in the repository: " + ", ".join(missing)


# --- every documented run command, dry-run --------------------------------------------------

# A command line a reader may copy: it starts like one of these.
COMMAND_START = re.compile(r"(MODULE=\w+ )?(python3? -m blockprune_jax\.(main|sweep) |"
                           r"launch/(gpu_host|tpu_vm)\.sh (run|sweep) |sbatch (--\S+ )*launch/)")
# Stand-ins the docs use for the reader's own values, and what a dry run puts in their place.
PLACEHOLDERS = {"=F,M,B": "=0.1,0.3,0.5", "ratios=...": "ratios=0.1,0.3,0.5",
                "<front>,<middle>,<back>": "0.1,0.3,0.5", "<W&B run id>": "run"}
# Commands that name the reader's own earlier run, which a dry run cannot have.
NEEDS_AN_EARLIER_RUN = ("runs/pruned_run/export",)


def _command_lines(name, text):
  """Command lines in a doc: fenced code (continuation lines joined), inline code, and the
  `#   usage` comment lines of launch/'s scripts."""
  text = re.sub(r"\\\n[#\s]*", " ", text)
  if name.endswith(".md"):
    blocks = re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    lines = [l for b in blocks for l in b.splitlines()]
    lines += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", _without_code_blocks(text))]
  else:
    lines = [l.lstrip("#").strip() for l in text.splitlines()]
  out = []
  for line in lines:
    line = re.sub(r"\s+", " ", re.sub(r"\s+#.*", "", line)).strip()
    for part in re.split(r" && | \| ", line):
      if COMMAND_START.match(part) and "[CONFIG]" not in part and " ... " not in part + " ":
        out.append(part)
  return out


def _as_cli(command):
  """(module, config path, {key: text}, [--sweep specs]) of a main / sweep / launch command."""
  for old, new in PLACEHOLDERS.items():
    command = command.replace(old, new)
  argv = shlex.split(command)
  module = "sweep" if argv[0] == "MODULE=sweep" or argv[:2] == ["launch/gpu_host.sh", "sweep"] \
      or argv[:2] == ["launch/tpu_vm.sh", "sweep"] else "main"
  if argv[0].startswith("MODULE="):
    argv = argv[1:]
  if argv[0] in ("python", "python3"):
    flags = argv[3:]
  else:  # launch scripts: [sbatch flags] SCRIPT [run|sweep] CONFIG WORKDIR FLAGS...
    argv = argv[next(i for i, a in enumerate(argv) if a.startswith("launch/")) + 1:]
    argv = argv[1:] if argv[0] in ("run", "sweep") else argv
    flags = [f"--config={argv[0]}", f"--workdir={argv[1]}"] + argv[2:]
  config = next(f.split("=", 1)[1] for f in flags if f.startswith("--config="))
  overrides = dict(f[len("--config."):].split("=", 1) for f in flags if f.startswith("--config."))
  return module, config, overrides, [f.split("=", 1)[1] for f in flags if f.startswith("--sweep=")]


def dry_run(command):
  """What `main` / `sweep` check before any work, without the work: the config file with its
  :arg loads, the --config.* overrides name keys and parse, and every run of the sweep (with its
  dense controls) passes validation. Returns the number of runs."""
  from blockprune_jax import config_lib, sweep, validate  # pylint: disable=import-outside-toplevel
  _, path, overrides, specs = _as_cli(command)
  file, _, arg = path.partition(":")
  module = config_lib.load_file(os.path.join(REPO, file), "_docs_dry_run")
  config = config_lib.apply_overrides(module.get_config(arg) if arg else module.get_config(),
                                      overrides)
  listed = sweep.load_get_sweep(os.path.join(REPO, path))
  runs = sweep.expand_sweep(config, specs, listed)
  if specs or listed:
    runs = sweep.with_controls(config, runs)
  for run in runs:
    validate.validate(config_lib.apply_overrides(config, run))
  return len(runs)


def test_the_command_finder_reads_fences_spans_and_usage_lines():
  md = ("```bash\npython -m blockprune_jax.main --config=configs/blocks.py --workdir=w \\\n"
        "    --config.seed=1   # a comment\nlaunch/gpu_host.sh setup && launch/gpu_host.sh run "
        "configs/eval.py runs/e\n```\nor `sbatch launch/slurm.sbatch configs/base.py runs/x`.\n")
  assert _command_lines("a.md", md) == [
      "python -m blockprune_jax.main --config=configs/blocks.py --workdir=w --config.seed=1",
      "launch/gpu_host.sh run configs/eval.py runs/e",
      "sbatch launch/slurm.sbatch configs/base.py runs/x"]
  assert _as_cli("MODULE=sweep sbatch --nodes=1 launch/slurm.sbatch configs/blocks.py runs/g "
                 "--sweep=seed=0,1") == ("sweep", "configs/blocks.py", {}, ["seed=0,1"])
  assert _command_lines("x.sh", "#   launch/tpu_vm.sh run [CONFIG] [WORKDIR]\n") == []


def test_every_documented_run_command_passes_a_dry_run():
  from blockprune_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  commands = sorted({c for name, text in _docs().items() for c in _command_lines(name, text)
                     if not any(p in c for p in NEEDS_AN_EARLIER_RUN)})
  assert len(commands) >= 20  # the finder still finds the docs' commands
  failed = []
  for command in commands:
    try:
      assert dry_run(command) >= 1
    except UserError as e:
      failed.append(f"{command}: {e}")
  assert not failed, "\n".join(failed)
  with pytest.raises(UserError, match="prune.targt"):
    dry_run("python -m blockprune_jax.main --config=configs/blocks.py --workdir=w "
            "--config.prune.targt=0.5")
