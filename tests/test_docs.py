"""The documentation stays short and connected: README.md fits in 250 lines and starts with the
two commands CI runs, and every link, repository path and `python -m blockprune_jax.X` module
named in README.md, docs/ and launch/ exists, so moving a file or renaming a section breaks a
test instead of a reader's click."""
import glob
import os
import re

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
