"""Paths into plain nested-dict pytrees (params, masks): ('h_0', 'mlp', 'c_fc', 'kernel')."""


def leaf_paths(tree, prefix=()):
  """Yields the path of every non-dict leaf, depth first in insertion order."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def get_path(tree, path, default=None):
  """The value at `path`, or `default` where the path does not exist."""
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return default
    tree = tree[k]
  return tree


def set_path(tree, path, value):
  """Sets `value` at `path`, creating the dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value
