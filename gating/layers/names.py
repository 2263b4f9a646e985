"""Older spellings that still work, each with a one-line notice.

Saved configs, checkpoints and scripts written before a rename carry the old names, so
they are read forever; each use prints one FutureWarning line naming the new spelling
(Python shows a warning once per place in the code). The word "router" once had four
meanings; each now has a name of its own:

  router='mean' | 'prefix' | 'first' | 'input_free'   the router kind: how the router
                                                      reads a sequence (router.ROUTERS)
  router='input_free'        was router='static': one learned logit per unit, for every
                             sequence (gate='static', the rule, keeps its name)
  group_router='own' | 'attention'   was mlp_router='own' | 'shared': which router scores
                             a block's MLP channel groups
  fit_router --static-subset was fit_router --router static: fit one subset for all
"""

from __future__ import annotations

import warnings

ROUTER_KINDS = {'static': 'input_free'}          # router=, Rule.router
GROUP_ROUTERS = {'shared': 'attention'}          # group_router= (the values)


def renamed(what: str, old: str, new: str, stacklevel: int = 3) -> None:
  """The one-line notice that `old` is now spelled `new`."""
  warnings.warn(f'{what} {old!r} is now {new!r} (the old name still works)', FutureWarning,
                stacklevel=stacklevel)


def router_kind(name):
  """A router kind's current name (None stays None)."""
  if name in ROUTER_KINDS:
    renamed('router', name, ROUTER_KINDS[name], stacklevel=4)
    return ROUTER_KINDS[name]
  return name


def group_router_value(value):
  """A group_router value's current spelling ('shared' -> 'attention')."""
  if value in GROUP_ROUTERS:
    renamed('group_router', value, GROUP_ROUTERS[value], stacklevel=4)
    return GROUP_ROUTERS[value]
  return value


def group_router_keyword(group_router, mlp_router, default: str = 'own') -> str:
  """The group router from the keyword group_router= or its older spelling mlp_router=
  (with its notice); a ValueError when both are given."""
  if mlp_router is not None:
    if group_router is not None:
      raise ValueError('pass group_router= only (mlp_router= is its older spelling), not both')
    renamed('keyword', 'mlp_router', 'group_router', stacklevel=4)
    group_router = mlp_router
  return default if group_router is None else group_router_value(group_router)
