"""Frozen dataclass configs, validated on construction; `override` applies 'a.b=value' strings.

A run is a `TrainConfig` (model, data, loss, optim and the loop's own settings). Variants
are `dataclasses.replace` calls or command-line overrides such as `model.active_heads=2`.
Every check raises a ValueError that names the bad field.

Saved configs (a run folder's config.json, a checkpoint's metadata) carry
`format: FORMAT`. `from_dict` reads any format up to this one: a field that a saved config
lacks (it was added later) takes its default, so a new field never makes an older run "a
different model". `compatibility` is the part of a config that decides whether a
checkpoint fits a run: every model field except the compute path, which by the masked /
gathered contract does not change the function. Data identity is the data fingerprint
(training.loop.check_compatible), not the data settings. The `log` section (where metrics
go besides metrics.jsonl) never counts: a run resumes with W&B turned on or off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

from gating.layers import names
from gating.layers.block import MLPS, NORMS
from gating.layers.compute import UNITS, rope_inv_freq
from gating.layers.router import ROUTERS
from gating.layers.selection import NOISES, RULES, check_shared, get_rule
from gating.training.elastic import check_ks as check_elastic_ks
from gating.training.elastic import group_ks as elastic_group_ks
from gating.training.importance import LABELS
from gating.training.router_fit import LOSSES as ROUTER_LOSSES

PATHS = ('masked', 'gathered')
FORMAT = 3               # 1: configs written before the format key (read the same way);
                         # 2: model.mlp_router and router 'static' (read as group_router
                         # and 'input_free', the names of format 3)
# Fields renamed since: (section, old name) -> new name (read with a one-line notice).
RENAMED_FIELDS = {('model', 'mlp_router'): 'group_router'}
# Model fields that choose how the same parameters run, not which model they are (and
# where pretrained weights were first read from: the checkpoints hold them since).
NOT_COMPATIBILITY = ('path', 'eval_path', 'pretrained')
DTYPES = ('float32', 'bfloat16')
WANDB_FORBIDDEN = '/\\#?%:'     # characters W&B refuses in a project name


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ValueError(f'{field}: {message}')


def _check_shared(name: str, shared: int, k, num_units: int, gate: str, **names) -> None:
  """selection.check_shared as a config error (model.shared_heads, model.shared_groups)."""
  try:
    check_shared(shared, k, num_units, gate, name=name, **names)
  except ValueError as e:
    raise ValueError(f'model.{e}') from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The gated Transformer (GatedLM for kind='lm', GatedEncoder for kind='encoder')."""
  kind: str = 'lm'
  num_layers: int = 2
  features: int = 64
  num_heads: int = 8
  head_dim: int | None = None            # Dh; default features // num_heads
  mlp_features: int | None = None        # default 4 * features
  positions: str = 'learned'             # 'learned' | 'rotary'
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  prefix_len: int | None = None          # P; None: the data's prompt length (synthetic)
  gate: str = 'topk'                     # a rule in gating.layers.selection.RULES
  gate_options: tuple[tuple[str, float | str], ...] = ()  # the rule's options, by name:
                                  # on the command line model.gate_options=p=0.9,cap=4 (a
                                  # name where the option is one: assigner=cluster)
  active_heads: int | tuple[int, ...] | None = 2   # K, or one K per layer
  mlp_groups: int | None = None          # G: gate each MLP's channels in G groups (None: off)
  active_groups: int | tuple[int, ...] | None = None  # Kf of G open groups, or one per layer
  group_router: str = 'own'              # 'own' | 'attention': which router scores the
                                         # MLP's groups (older: mlp_router own | shared)
  path: str = 'masked'                   # the training path
  eval_path: str = 'gathered'            # the path of evaluation (needs K; dense: masked)
  noise: str | None = None               # 'gumbel' | 'jitter' exploration noise in training
  noise_scale: float = 1.0
  scaled_weights: bool = False
  temperature: float | None = None       # the rule's default when None
  router: str | None = None              # the router kind (gating.layers.router.ROUTERS);
                                         # None: the model's ('prefix' LM, 'mean' encoder)
  router_hidden_features: int | None = None
  router_init_logit: float = 0.0
  shared_heads: int = 0                  # S always-on heads per layer; K counts them (MoH)
  shared_groups: int = 0                 # Sf always-open groups per MLP; Kf counts them
  num_kv_heads: int | None = None        # G K/V heads (grouped-query attention); None: H
  unit: str | None = None                # what a gate opens with G < H: 'kv_group' (the
                                         # default) | 'query_head'
  norm: str = 'layer'                    # 'layer' (LayerNorm) | 'rms' (RMSNorm)
  norm_eps: float | None = None          # the norms' epsilon (None: flax's)
  mlp: str = 'gelu'                      # 'gelu' | 'swiglu' (Llama, Qwen)
  mlp_bias: bool = True
  qkv_bias: bool = True                  # biases of the q, k and v projections
  out_bias: bool | None = None           # the output projection's (None: qkv_bias)
  qk_norm: bool = False                  # RMSNorm over each head of q and k (Qwen3)
  rotary_base: float = 10000.0           # RoPE's base, for positions='rotary'
  rotary_scaling: str | None = None      # Hugging Face rope_scaling as JSON (e.g. llama3)
  pretrained: str | None = None          # a Hugging Face checkpoint folder: the model's
                                         # weights at step 0 (gating.load_pretrained)
  dtype: str = 'float32'                 # compute dtype; parameters stay float32

  def __post_init__(self):
    _check(self.kind in ('lm', 'encoder'), 'model.kind', f"must be 'lm' or 'encoder', got {self.kind!r}")
    for name in ('num_layers', 'features', 'num_heads'):
      _check(getattr(self, name) >= 1, f'model.{name}', f'must be >= 1, got {getattr(self, name)}')
    _check(self.head_dim is not None or self.features % self.num_heads == 0, 'model.features',
           f'{self.features} is not divisible by num_heads={self.num_heads} (or set head_dim)')
    _check(self.head_dim is None or self.head_dim >= 1, 'model.head_dim',
           f'must be >= 1, got {self.head_dim}')
    _check(self.positions in ('learned', 'rotary'), 'model.positions',
           f"must be 'learned' or 'rotary', got {self.positions!r}")
    _check(0.0 <= self.dropout_rate < 1.0, 'model.dropout_rate',
           f'must be in [0, 1), got {self.dropout_rate}')
    _check(self.prefix_len is None or self.prefix_len >= 1, 'model.prefix_len',
           f'must be >= 1, got {self.prefix_len}')
    _check(self.gate in RULES, 'model.gate', f'must be one of {tuple(RULES)}, got {self.gate!r}')
    rule = get_rule(self.gate)
    option_names = [name for name, _ in self.gate_options]
    _check(len(option_names) == len(set(option_names)), 'model.gate_options',
           f'names an option twice: {option_names}')
    try:
      rule.resolve_options(dict(self.gate_options))
    except ValueError as e:
      raise ValueError(f'model.gate_options: {e}') from None
    if self.gate == 'slices' and self.kind == 'encoder':
      assigner = dict(self.gate_options).get('assigner', 'label')
      _check(assigner == 'cluster', 'model.gate_options',
             f"assigner={assigner!r} with an encoder: an encoder's label is the class it "
             "predicts, so 'label' would hand it the answer, and 'prefix_loss' scores a "
             "language model's loss on the prefix; use assigner=cluster")
    _check(self.path in PATHS, 'model.path', f'must be one of {PATHS}, got {self.path!r}')
    _check(not (rule.per_token and self.path == 'gathered'), 'model.path',
           f"gate={self.gate!r} decides per token: it trains on path 'masked' only")
    _check(self.eval_path in PATHS, 'model.eval_path',
           f'must be one of {PATHS}, got {self.eval_path!r}')
    _check(self.noise in NOISES, 'model.noise', f'must be one of {NOISES}, got {self.noise!r}')
    _check(self.dtype in DTYPES, 'model.dtype', f'must be one of {DTYPES}, got {self.dtype!r}')
    self._check_architecture()
    if self.router is not None:   # older spellings: a notice, then the current name
      router = names.router_kind(self.router)
      _check(router in ROUTERS, 'model.router',
             f'must be one of {tuple(ROUTERS)}, got {self.router!r}')
      object.__setattr__(self, 'router', router)
    object.__setattr__(self, 'group_router', names.group_router_value(self.group_router))
    ks = self.active_heads if isinstance(self.active_heads, tuple) else (self.active_heads,)
    if isinstance(self.active_heads, tuple):
      _check(len(ks) == self.num_layers, 'model.active_heads',
             f'has {len(ks)} entries for num_layers={self.num_layers}')
    for k in ks:
      _check(k is None or 1 <= k <= self.num_heads, 'model.active_heads',
             f'K={k} must be in [1, num_heads={self.num_heads}]')
    _check(not rule.needs_k or None not in ks, 'model.active_heads', f"gate={self.gate!r} needs K")
    _check(rule.budget != 'none' or all(k in (None, self.num_heads) for k in ks),
           'model.active_heads',
           f"gate={self.gate!r} opens all heads: K must be None or {self.num_heads}")
    needs_k = 'gathered' in (self.path, self.eval_path) and rule.budget != 'none'
    _check(not needs_k or None not in ks, 'model.active_heads',
           "the gathered path (model.path or model.eval_path) needs K; set "
           "model.eval_path='masked' for a rule without a budget")
    self._check_groups(rule, needs_k)
    for k in ks:
      _check_shared('shared_heads', self.shared_heads, k, self.num_heads, self.gate)

  def _check_architecture(self) -> None:
    """Grouped-query attention, the block's norm and MLP, and RoPE's scaling."""
    G = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    _check(G >= 1 and self.num_heads % G == 0, 'model.num_kv_heads',
           f'G={G} must divide num_heads={self.num_heads}')
    _check(self.unit in (None,) + UNITS, 'model.unit',
           f'must be one of {UNITS}, got {self.unit!r}')
    size = self.num_heads // G if (self.unit or ('kv_group' if G < self.num_heads
                                                 else 'query_head')) == 'kv_group' else 1
    ks = self.active_heads if isinstance(self.active_heads, tuple) else (self.active_heads,)
    for k in ks:
      _check(k is None or k % size == 0, 'model.active_heads',
             f"K={k}: with unit='kv_group' a gate opens whole groups of {size} query "
             f'heads (H / G), so K must be a multiple of {size}')
    _check(self.shared_heads % size == 0, 'model.shared_heads',
           f"{self.shared_heads}: with unit='kv_group' shared heads come in groups of {size}")
    _check(self.norm in NORMS, 'model.norm', f'must be one of {NORMS}, got {self.norm!r}')
    _check(self.mlp in MLPS, 'model.mlp', f'must be one of {MLPS}, got {self.mlp!r}')
    _check(self.rotary_base > 0, 'model.rotary_base', f'must be > 0, got {self.rotary_base}')
    if self.rotary_scaling is not None:
      _check(self.positions == 'rotary', 'model.rotary_scaling', "needs positions='rotary'")
      try:
        rope_inv_freq(self.rotary_base, 2, json.loads(self.rotary_scaling))
      except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f'model.rotary_scaling: {e}') from None

  def _check_groups(self, rule, needs_k: bool) -> None:
    """mlp_groups G divides the MLP width F; active_groups Kf in [1, G] and only with G."""
    G, kfs = self.mlp_groups, self.active_groups
    _check(G is not None or kfs is None, 'model.active_groups',
           f'{kfs!r} needs model.mlp_groups (the number of channel groups G)')
    _check(self.group_router in ('own', 'attention'), 'model.group_router',
           f"must be 'own' or 'attention', got {self.group_router!r}")
    _check(self.group_router == 'own' or G is not None, 'model.group_router',
           "'attention' needs model.mlp_groups (the number of channel groups G)")
    reads_input = self.router is None or ROUTERS[self.router].reads_input
    _check(self.group_router == 'own' or (rule.router == 'input' and reads_input),
           'model.group_router', f"'attention' needs an attention router that reads the "
           f'input; gate={self.gate!r} with router={self.router!r} has none')
    _check(G is not None or not self.shared_groups, 'model.shared_groups',
           f'{self.shared_groups} needs model.mlp_groups (the number of channel groups G)')
    if G is None:
      return
    F = self.mlp_features or 4 * self.features
    _check(G >= 1 and F % G == 0, 'model.mlp_groups',
           f'G={G} must be >= 1 and divide the MLP width F={F}')
    kfs = kfs if isinstance(kfs, tuple) else (kfs,)
    if isinstance(self.active_groups, tuple):
      _check(len(kfs) == self.num_layers, 'model.active_groups',
             f'has {len(kfs)} entries for num_layers={self.num_layers}')
    for kf in kfs:
      _check(kf is None or 1 <= kf <= G, 'model.active_groups',
             f'Kf={kf} must be in [1, mlp_groups={G}]')
    _check(not rule.needs_k or None not in kfs, 'model.active_groups',
           f'gate={self.gate!r} needs Kf')
    _check(rule.budget != 'none' or all(kf in (None, G) for kf in kfs),
           'model.active_groups', f'gate={self.gate!r} opens all groups: Kf must be None or {G}')
    _check(not needs_k or None not in kfs, 'model.active_groups',
           'the gathered path (model.path or model.eval_path) needs Kf')
    for kf in kfs:
      _check_shared('shared_groups', self.shared_groups, kf, G, self.gate,
                    budget='active_groups', count='mlp_groups', units='groups')

  @property
  def effective_eval_path(self) -> str:
    """A rule without a budget (dense), or a per-token rule, evaluates on the masked path."""
    rule = get_rule(self.gate)
    return 'masked' if rule.budget == 'none' or rule.per_token else self.eval_path

  @property
  def budget(self) -> tuple[int, ...]:
    """K per layer (num_heads where no budget is set)."""
    ks = self.active_heads if isinstance(self.active_heads, tuple) else (
        (self.active_heads,) * self.num_layers)
    return tuple(self.num_heads if k is None else k for k in ks)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data (see gating/data/tasks.py and corpus.py for the meaning of each knob)."""
  kind: str = 'synthetic'                # 'synthetic' | 'text'
  seed: int = 0                          # which rows (synthetic) / documents (text) go
                                         # where; fixed across training seeds by default
  # synthetic benchmark (gating.data.synthetic)
  num_tasks: int = 16                    # permutation tasks (each its own fixed pattern)
  input_len: int = 12                    # n: digits of input per sequence
  num_digits: int = 10                   # digit vocabulary
  num_recall_tasks: int = 2              # key-value recall tasks (offsets 0, 1, ...)
  num_induction_tasks: int = 2           # induction tasks (copy 1, 2, ... tokens)
  num_train: int = 100_000
  num_validation: int = 2_000
  num_test: int = 4_000
  task_seed: int = 0                     # the task definitions (permutations)
  num_terms: int = 1                     # input digits summed into each answer digit of
                                         # a permutation task (1: the permutation)
  # text (gating.data.text)
  sources: tuple[str, ...] = ('python', 'pydoc', 'shakespeare')
  seq_len: int = 128
  max_bytes_per_domain: int | None = 1_200_000
  tokenizer: str = 'bytes'               # or an HF tokenizer name (needs transformers)

  def __post_init__(self):
    _check(self.kind in ('synthetic', 'text'), 'data.kind',
           f"must be 'synthetic' or 'text', got {self.kind!r}")
    for name in ('num_tasks', 'input_len', 'num_digits', 'num_train', 'num_validation',
                 'num_test', 'seq_len', 'num_terms'):
      _check(getattr(self, name) >= 1, f'data.{name}', f'must be >= 1, got {getattr(self, name)}')
    for name in ('num_recall_tasks', 'num_induction_tasks'):
      _check(getattr(self, name) >= 0, f'data.{name}', f'must be >= 0, got {getattr(self, name)}')
    _check(self.num_terms <= self.input_len, 'data.num_terms',
           f'must be <= data.input_len={self.input_len} (the terms of one answer sit at '
           f'distinct positions), got {self.num_terms}')
    _check(self.kind != 'text' or len(self.sources) >= 1, 'data.sources', 'must name a source')
    _check(self.max_bytes_per_domain is None or self.max_bytes_per_domain > 0,
           'data.max_bytes_per_domain', f'must be > 0, got {self.max_bytes_per_domain}')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the sparsity terms (DESIGN 4); 0 switches a term off."""
  l0_weight: float = 0.0                 # expected L0: sum of P(open) per layer, / H
  l1_weight: float = 0.0                 # L1 of the gate weights, / H
  target_fraction: float | None = None   # Lagrangian target t of the active-head fraction
  target_warmup_steps: int = 0           # t ramps from 1 to target_fraction over these steps
  load_balance_weight: float = 0.0       # Switch: H sum_h f_h P_h, per micro-batch
  z_loss_weight: float = 0.0             # ST-MoE router z-loss
  elastic_ks: tuple[int, ...] = ()       # elastic training: one random-subset sub-model per
                                         # K each step, beside the full model (off: ())
  elastic_group_ks: tuple[int, ...] = ()  # Kf of each elastic sub-model's MLP groups, one per
                                         # K of elastic_ks (default: K G / H)
  distill_weight: float = 1.0            # a: sub-models learn (1 - a) targets + a full pass
  router_labels: str | None = None       # fit only the routers to the frozen model's head
                                         # importance: 'ablation' | 'grad_x_act' | 'output_norm'
  router_loss: str = 'bce'               # ... by 'bce' on the top-K heads or 'listwise'

  def __post_init__(self):
    for name in ('l0_weight', 'l1_weight', 'load_balance_weight', 'z_loss_weight',
                 'target_warmup_steps'):
      _check(getattr(self, name) >= 0, f'loss.{name}', f'must be >= 0, got {getattr(self, name)}')
    _check(self.target_fraction is None or 0 < self.target_fraction <= 1,
           'loss.target_fraction', f'must be in (0, 1], got {self.target_fraction}')
    _check(self.target_fraction is not None or self.target_warmup_steps == 0,
           'loss.target_warmup_steps', 'ramps loss.target_fraction, which is not set')
    _check(0 <= self.distill_weight <= 1, 'loss.distill_weight',
           f'must be in [0, 1], got {self.distill_weight}')
    sparsity = ('l0_weight', 'l1_weight', 'load_balance_weight', 'z_loss_weight')
    _check(not self.elastic_ks or (not any(getattr(self, n) for n in sparsity)
                                   and self.target_fraction is None),
           'loss.elastic_ks', 'elastic training uses random subsets, not the routers: turn '
           'the sparsity terms off (l0, l1, load_balance, z_loss, target_fraction)')
    _check(self.router_labels in (None,) + LABELS, 'loss.router_labels',
           f'must be one of {LABELS}, got {self.router_labels!r}')
    _check(self.router_loss in ROUTER_LOSSES, 'loss.router_loss',
           f'must be one of {ROUTER_LOSSES}, got {self.router_loss!r}')
    _check(self.router_labels is None or not (
        self.elastic_ks or any(getattr(self, n) for n in sparsity)
        or self.target_fraction is not None),
           'loss.router_labels', 'router fitting trains only the routers on importance '
           'labels: turn elastic_ks and the sparsity terms off')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with clipping, linear warmup and cosine decay; separate router and multiplier rates."""
  learning_rate: float = 3e-3
  router_learning_rate: float | None = None   # default: learning_rate
  lagrange_learning_rate: float = 1e-2        # gradient ascent on the Lagrange multipliers
  warmup_steps: int = 100
  final_learning_rate_fraction: float = 0.1   # cosine decays to this fraction
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.98

  def __post_init__(self):
    _check(self.learning_rate > 0, 'optim.learning_rate', f'must be > 0, got {self.learning_rate}')
    _check(self.router_learning_rate is None or self.router_learning_rate > 0,
           'optim.router_learning_rate', f'must be > 0, got {self.router_learning_rate}')
    _check(self.lagrange_learning_rate >= 0, 'optim.lagrange_learning_rate',
           f'must be >= 0, got {self.lagrange_learning_rate}')
    _check(self.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {self.warmup_steps}')
    _check(0 <= self.final_learning_rate_fraction <= 1, 'optim.final_learning_rate_fraction',
           f'must be in [0, 1], got {self.final_learning_rate_fraction}')
    _check(self.weight_decay >= 0, 'optim.weight_decay', f'must be >= 0, got {self.weight_decay}')
    _check(self.clip_norm > 0, 'optim.clip_norm', f'must be > 0, got {self.clip_norm}')


@dataclasses.dataclass(frozen=True)
class LogConfig:
  """Where the metrics go besides metrics.jsonl and the TensorBoard event files."""
  wandb: str | None = None               # a W&B project: log to W&B too (offline unless
                                         # WANDB_MODE is set; training/wandb_log.py)

  def __post_init__(self):
    if self.wandb is None:
      return
    _check(isinstance(self.wandb, str) and self.wandb.strip() != '', 'log.wandb',
           f'must be a W&B project name (or none: off), got {self.wandb!r}')
    bad = sorted(set(self.wandb) & set(WANDB_FORBIDDEN))
    _check(len(self.wandb) <= 128 and not bad, 'log.wandb',
           f'{self.wandb!r} is not a W&B project name (at most 128 characters, none of '
           f'{" ".join(WANDB_FORBIDDEN)})')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  log: LogConfig = LogConfig()
  steps: int = 1000
  batch_size: int = 64
  grad_accum: int = 1                    # micro-batches per step
  seed: int = 0
  eval_every: int | None = None          # default: a fifth of the run
  eval_batches: int = 8
  checkpoint_every: int | None = None    # default: a tenth of the run
  keep_checkpoints: int = 3
  temperature_start: float | None = None # anneal the rule's temperature ...
  temperature_end: float | None = None   # ... geometrically to this value ...
  temperature_steps: int = 0             # ... over these steps (traced: no recompilation)
  k_schedule: tuple[tuple[int, int], ...] = ()  # ((K, until_step), ...), then model.active_heads
  init_from: str | None = None           # a run folder: warm start from its final parameters

  def __post_init__(self):
    for name in ('batch_size', 'grad_accum', 'eval_batches', 'keep_checkpoints'):
      _check(getattr(self, name) >= 1, name, f'must be >= 1, got {getattr(self, name)}')
    _check(self.steps >= 1 or (self.steps == 0 and self.model.pretrained is not None),
           'steps', f'must be >= 1 (0 only with model.pretrained: a checkpoint converted '
           f'into a run folder, not trained), got {self.steps}')
    _check(self.batch_size % self.grad_accum == 0, 'batch_size',
           f'{self.batch_size} is not divisible by grad_accum={self.grad_accum}')
    for name in ('eval_every', 'checkpoint_every'):
      value = getattr(self, name)
      _check(value is None or value >= 1, name, f'must be >= 1, got {value}')
    _check((self.temperature_start is None) == (self.temperature_end is None),
           'temperature_start', 'set both temperature_start and temperature_end, or neither')
    _check(self.temperature_start is None or (self.temperature_start > 0 and
                                              self.temperature_end > 0),
           'temperature_start', 'temperatures must be > 0')
    _check(self.temperature_steps >= 0, 'temperature_steps',
           f'must be >= 0, got {self.temperature_steps}')
    _check(self.temperature_start is not None or self.temperature_steps == 0,
           'temperature_steps', 'anneals from temperature_start to temperature_end, which '
           'are not set')
    _check(self.seed >= 0, 'seed', f'must be >= 0, got {self.seed}')
    if self.loss.elastic_ks:
      check_elastic_ks(self.loss.elastic_ks, self.model.num_heads, self.model.shared_heads)
      elastic_group_ks(self.loss.elastic_ks, self.loss.elastic_group_ks, self.model.num_heads,
                       self.model.mlp_groups, self.model.shared_groups)
      _check(self.model.group_router == 'own', 'loss.elastic_ks',
             'elastic training draws random groups: model.group_router must be own')
      _check(not self.k_schedule, 'loss.elastic_ks', 'elastic training has no k_schedule')
      _check(self.model.gate != 'slices', 'loss.elastic_ks',
             "elastic training draws random heads; the 'slices' gate's are assigned")
    else:
      _check(not self.loss.elastic_group_ks, 'loss.elastic_group_ks',
             'needs loss.elastic_ks (one Kf per K)')
    if self.loss.router_labels:
      m = self.model
      _check(self.init_from is not None, 'loss.router_labels',
             'router fitting needs init_from: the trained run whose routers to fit')
      _check(get_rule(m.gate).router == 'input' and get_rule(m.gate).needs_k,
             'loss.router_labels', f'needs a rule with a budget K and a router it trains '
             f"(e.g. topk; router='input_free' fits one subset for all), got gate={m.gate!r}")
      _check(not self.k_schedule, 'loss.router_labels', 'router fitting has no k_schedule')
    last = 0
    for k, until in self.k_schedule:
      _check(1 <= k <= self.model.num_heads, 'k_schedule',
             f'K={k} must be in [1, num_heads={self.model.num_heads}] (k_schedule='
             + ','.join(f'{budget}:{step}' for budget, step in self.k_schedule)
             + ", the preset's unless set: set one for these heads, or k_schedule= for none)")
      _check(until > last, 'k_schedule', f'steps must increase, got {self.k_schedule}')
      last = until
    _check(not self.k_schedule or get_rule(self.model.gate).budget != 'none', 'k_schedule',
           f"the {self.model.gate!r} gate has no budget to schedule")
    _check(not self.k_schedule or self.model.gate != 'slices', 'k_schedule',
           "the 'slices' gate assigns each sequence one of (H - S) / (K - S) slices for "
           'the whole run: another K would change the slices under that assignment (set '
           'k_schedule= for none)')
    for k, _ in self.k_schedule:   # each scheduled K must make a valid model on its own
      try:
        dataclasses.replace(self.model, active_heads=k)
      except ValueError as e:
        raise ValueError(f'k_schedule: K={k} does not fit this model: {e}') from None

  @property
  def eval_interval(self) -> int:
    return self.eval_every or max(1, self.steps // 5)

  @property
  def checkpoint_interval(self) -> int:
    return self.checkpoint_every or max(1, self.steps // 10)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'format': FORMAT}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)


SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'loss': LossConfig, 'optim': OptimConfig,
            'log': LogConfig}


def from_dict(values: dict[str, Any]) -> TrainConfig:
  """The inverse of TrainConfig.to_dict (e.g. a run folder's config.json).

  Reads every format up to FORMAT (a config without 'format' is format 1); fields that
  `values` lacks take their defaults. A newer format, or a key this version does not know,
  is a ValueError naming it.
  """
  values = dict(values)
  version = values.pop('format', 1)
  if not isinstance(version, int) or not 1 <= version <= FORMAT:
    raise ValueError(f'config format {version!r} is not one this version reads (1 to '
                     f'{FORMAT}); it was written by a newer headgate')
  sections = {name: _from_fields(cls, _renamed(name, values.get(name, {})))
              for name, cls in SECTIONS.items()}
  top = {k: v for k, v in values.items() if k not in SECTIONS}
  return _from_fields(TrainConfig, top, **sections)


def read_config(path: str) -> TrainConfig:
  """A run folder's config.json (`from_dict`); a file that is not JSON, or not a config
  this version reads, is a ValueError naming the file."""
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not JSON ({e}); the file is damaged') from None
  if not isinstance(values, dict):
    raise ValueError(f'{path}: not a config (a JSON {type(values).__name__}, not an object)')
  try:
    return from_dict(values)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def _renamed(section: str, values: dict[str, Any]) -> dict[str, Any]:
  """A section's saved values with renamed fields under their current names (a notice for
  each; names.py)."""
  values = dict(values)
  for (where, old), new in RENAMED_FIELDS.items():
    if where == section and old in values:
      names.renamed('config key', f'{section}.{old}', f'{section}.{new}', stacklevel=4)
      values[new] = values.pop(old)
  return values


def with_pretrained(cfg: TrainConfig) -> TrainConfig:
  """`cfg` with the architecture of its model.pretrained checkpoint (its config.json: the
  layers, widths, heads, norms, MLP, biases, RoPE; gating.pretrained.config_fields) and
  that checkpoint's own tokenizer for the text data (data.tokenizer left at 'bytes'
  becomes the checkpoint folder). Unchanged without model.pretrained. A ValueError for
  data that is not text or another tokenizer."""
  folder = cfg.model.pretrained
  if folder is None:
    return cfg
  from gating import pretrained  # pylint: disable=import-outside-toplevel
  model = dataclasses.replace(cfg.model, **pretrained.config_fields(folder))
  data = cfg.data
  _check(data.kind == 'text', 'model.pretrained', 'a pretrained language model reads text: '
         'set data.kind=text')
  if data.tokenizer == 'bytes':
    data = dataclasses.replace(data, tokenizer=folder)
  _check(os.path.abspath(data.tokenizer) == os.path.abspath(folder), 'data.tokenizer',
         f'{data.tokenizer!r}: the data of a pretrained model must be tokenized with the '
         f"checkpoint's own tokenizer ({folder})")
  return dataclasses.replace(cfg, model=model, data=data)


def compatibility(cfg: TrainConfig) -> dict[str, Any]:
  """What decides whether a checkpoint fits a run: the model fields (without the compute
  paths), as JSON values."""
  model = dataclasses.asdict(cfg.model)
  return json.loads(json.dumps({f'model.{k}': v for k, v in model.items()
                                if k not in NOT_COMPATIBILITY}))


# What a run may change when it resumes: how often it evaluates and checkpoints, what it
# logs, and its length (the loop's check_schedule). The model is `compatibility`'s, the
# data its fingerprint's (a moved data file is the same data); init_from is read only at
# step 0 (a sweep folder that moved names its warm start at the new path).
RESUMABLE_CHANGES = ('steps', 'eval_every', 'eval_batches', 'checkpoint_every',
                     'keep_checkpoints', 'log', 'model', 'data', 'init_from')


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
  """What decides a run's trajectory beside its model and data (loss and optimizer
  settings, batch size, gradient accumulation, seed, temperature and K schedules): every
  field but RESUMABLE_CHANGES, sections' fields as 'section.field', as JSON values."""
  settings: dict[str, Any] = {}
  for name, value in dataclasses.asdict(cfg).items():
    if name in RESUMABLE_CHANGES:
      continue
    settings.update({f'{name}.{k}': v for k, v in value.items()} if isinstance(value, dict)
                    else {name: value})
  return json.loads(json.dumps(settings))


def _from_fields(cls, values, **extra):
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'unknown {cls.__name__} keys {unknown}; known: {sorted(known)}')
  return cls(**{k: _as_type(v, hints[k]) for k, v in values.items()}, **extra)


def _as_type(value, hint):
  """JSON values back to the field's type (lists -> tuples)."""
  if isinstance(value, list):
    return tuple(_as_type(v, _tuple_item(hint)) for v in value)
  return value


def _tuple_item(hint):
  for arg in typing.get_args(hint) or ():
    if typing.get_origin(arg) is tuple:
      return typing.get_args(arg)[0]
  if typing.get_origin(hint) is tuple:
    return typing.get_args(hint)[0]
  return Any


def override(config: TrainConfig, assignments: list[str]) -> TrainConfig:
  """Applies 'key=value' strings, e.g. 'model.active_heads=2', 'steps=500',
  'model.active_heads=1,2' (a tuple), 'k_schedule=8:200,4:400', 'model.noise=none'.

  All assignments are applied together and validated once, so their order never matters
  (e.g. 'model.gate=dense' and 'model.active_heads=none').
  """
  changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
  top: dict[str, Any] = {}
  for assignment in assignments:
    if '=' not in assignment:
      raise ValueError(f'override {assignment!r} is not of the form key=value')
    key, text = assignment.split('=', 1)
    section, _, field = key.strip().rpartition('.')
    if (section, field) in RENAMED_FIELDS:
      names.renamed('config key', key.strip(), f'{section}.{RENAMED_FIELDS[section, field]}')
      field = RENAMED_FIELDS[section, field]
      key = f'{section}.{field}'
    if section and section not in SECTIONS:
      raise ValueError(f'unknown config section {section!r} in {key!r}; known: '
                       f'{sorted(SECTIONS)}')
    cls = SECTIONS[section] if section else TrainConfig
    hints = typing.get_type_hints(cls)
    if field not in hints or (not section and field in SECTIONS):
      raise ValueError(f'unknown config key {key!r}; known {section or "top-level"} keys: '
                       f'{sorted(f.name for f in dataclasses.fields(cls))}')
    (changes[section] if section else top)[field] = parse_value(text.strip(), hints[field], key)
  sections = {name: dataclasses.replace(getattr(config, name), **fields)
              for name, fields in changes.items() if fields}
  return dataclasses.replace(config, **sections, **top)


def parse_value(text: str, hint, key: str):
  """Parses a command-line string into a value of the field's type hint."""
  options = typing.get_args(hint) if _is_union(hint) else (hint,)
  if text.lower() in ('none', 'null') and type(None) in options:
    return None
  errors = []
  for option in options:
    if option is type(None):
      continue
    try:
      return _parse_one(text, option)
    except (ValueError, TypeError) as e:
      errors.append(str(e))
  raise ValueError(f'cannot parse {key}={text!r} as {hint}: {"; ".join(errors)}')


def _is_union(hint) -> bool:
  return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _parse_one(text: str, hint):
  if hint is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'{text!r} is not a bool')
  if hint is int:
    return int(text)
  if hint is float:
    return float(text)
  if hint is str:
    return text
  if typing.get_origin(hint) is tuple:
    item = typing.get_args(hint)[0]
    if typing.get_origin(item) is tuple:  # pairs 'a:b,c:d' or 'name=value,name=value'
      pair = typing.get_args(item)
      chunks = [chunk.split('=' if '=' in chunk else ':') for chunk in text.split(',') if chunk]
      for chunk in chunks:
        if len(chunk) != len(pair):
          raise ValueError(f'{"=".join(chunk)!r} is not a pair a:b or name=value')
      return tuple(tuple(parse_value(p.strip(), t, '=') if _is_union(t) else
                         _parse_one(p.strip(), t) for p, t in zip(chunk, pair))
                   for chunk in chunks)
    return tuple(_parse_one(chunk, item) for chunk in text.split(',') if chunk)
  raise TypeError(f'unsupported type {hint}')
