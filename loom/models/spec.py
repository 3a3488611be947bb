"""What a model family tells the rest of loom: everything outside its folder reads this, never its modules.

A family is a folder under ``loom/models/`` holding its single-device model and a :class:`ModelSpec`
that it registers (:func:`loom.models.register`). The spec says, as data:

- how to **build** the model from a :class:`~loom.models.config.ModelConfig` (on the meta device: the
  engine allocates and initializes it after splitting it) and its **presets**, with the parameter
  counts their papers publish;
- its **tensor-parallel strategies**: module-name pattern -> ``colwise | rowwise | vocab | replicate``
  (:mod:`loom.parallel.strategy` resolves them; MindSpore's notation is accepted there too), and the
  few facts about its modules that tensor and sequence parallelism need (:class:`Sharding`);
- its **pipeline split** (:class:`PipelineSplit`): the container of its blocks, which of its other
  children run on the first stage and which on the last; and, from a config, which parameters the
  model built from it ties across them (``tied``; :meth:`ModelSpec.pipeline_split` puts both together);
- its **cost description** (:func:`loom.models.costs.model_costs` by default, derived from the modules
  themselves): parameters and forward FLOPs per token of every block and of the first and last
  stage's own modules, which ``loom describe``, the pipeline balancer and the planner all read;
- the **tasks** it can be trained for, its own first (:mod:`loom.tasks`);
- optionally, its **Hugging Face mapping** (:class:`HFMapping`): how a ``transformers`` model directory's
  config and tensors become its config and parameters, and back (:mod:`loom.models.hf`).

The model itself provides ``initial_value(name, shape, seed)`` (so that any layout initializes each
shard as one device would), ``tie_weights()`` and ``init_weights(seed)`` (both from
:class:`~loom.models.common.NameSeededInit`, the first overridden by a model that ties), and a
forward in three parts that a pipeline stage can run separately: ``embed(*inputs)`` (first stage) ->
each block -> ``head(hidden)`` (last stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from loom.models.config import ModelConfig


@dataclass(frozen=True)
class Sharding:
    """Tensor and sequence parallelism's view of a family's modules.

    ``table``: module-name pattern (``fnmatch``; ``*`` also matches dots) -> strategy; modules with
    weights that no pattern names are replicated. ``positional``: embeddings looked up by position,
    whose output is (T, C) rather than (B, T, C). ``local_positions``: those of them looked up inside
    the sequence-parallel region (their indices are this rank's slice of the positions).
    ``outside_query``: attention modules whose query comes from outside the residual stream, as a
    (B, T, C) tensor that is this rank's sequence slice under sequence parallelism (it is gathered).
    ``own_groups``: modules besides the blocks that data parallelism makes their own FSDP group (a
    communication bucket that overlaps with compute). ``stream_inputs``: attention and MLP modules
    (patterns) that read the residual stream itself rather than a LayerNorm's output (post-LayerNorm
    blocks): under sequence parallelism their inputs are gathered to the whole sequence first.
    ``whole_inputs``: modules (a dropout too) after the blocks whose input is already the whole sequence on every
    rank (a head behind a replicated projection that gathered the stream), not this rank's slice.
    ``cross_attention``: attention modules called as ``(x, memory, mask, cache)`` (an encoder-decoder's
    cross-attention): under sequence parallelism the decoder's ``x`` (unless a norm already gathered it)
    and the encoder's output ``memory`` are this rank's sequence slices, gathered whole first."""

    table: dict[str, str]
    positional: tuple[str, ...] = ()
    local_positions: tuple[str, ...] = ()
    outside_query: tuple[str, ...] = ()
    own_groups: tuple[str, ...] = ()
    stream_inputs: tuple[str, ...] = ()
    whole_inputs: tuple[str, ...] = ()
    cross_attention: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineSplit:
    """How the model is cut into pipeline stages.

    ``blocks``: the ``ModuleDict`` of blocks (keyed by their index) that the stages share out.
    ``first``: children that only the first stage holds and runs (embeddings); ``last``: children
    that only the last stage holds (final norm, heads); every other child must hold no parameters.
    ``tied``: (name, name) pairs of parameters that are one tensor on a single device, the first
    held by a last-stage module, the second by a first-stage module (an output projection tied to
    the input embedding): a last stage on a rank of its own keeps the second's module so the
    parameter keeps its name there, and the engine adds the two gradients after each step. A family
    leaves it empty in its spec's ``pipeline``: the pairs depend on the config (whether the model ties,
    whether the tied head exists for the task), and :meth:`ModelSpec.pipeline_split` fills them in."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    blocks: str = "layers"
    tied: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HFSource:
    """Where one loom parameter lives in a Hugging Face checkpoint: in tensor ``name``, transposed when
    ``transpose`` (GPT-2's ``Conv1D`` stores (in, out), ``nn.Linear`` (out, in)), starting at ``start``
    along dimension ``dim`` of the loom layout (one part of a fused tensor, e.g. the keys in GPT-2's
    ``c_attn``). A parameter is a rectangle of its source, so any shard of it is one too: each rank
    reads only the rectangle its shard needs. ``shape``: set when the stored tensor is the parameter
    reshaped (ViT's patch projection stored as a convolution's (C, channels, P, P) kernel, its [CLS] and
    position tables with a leading 1); such a (small) tensor is read whole and each rank keeps its part.
    ``scale``: the parameter is the stored tensor times ``scale`` (T5's query projection: T5 does not
    divide attention scores by sqrt(head width), loom does). ``shared``: several loom parameters are
    copies of this one tensor (T5 keeps a stack's relative-bias table in its first layer, loom one per
    layer); each reads it on import, and export writes the first (a warning when the others trained
    apart from it). ``fallback``: the tensor to read when the checkpoint has no ``name`` (T5 v1.1's
    output projection, which transformers 5 saves as the shared embedding)."""

    name: str
    transpose: bool = False
    dim: int = 0
    start: int = 0
    shape: tuple[int, ...] | None = None
    scale: float = 1.0
    shared: bool = False
    fallback: str | None = None


@dataclass(frozen=True)
class HFMapping:
    """How a family reads and writes the ``transformers`` format (:mod:`loom.models.hf` applies it).

    ``model_types``: the ``model_type`` values of ``config.json`` it reads. ``config_from_hf``: a
    ``config.json`` dict -> ``model.*`` settings (:class:`~loom.errors.ConfigError` naming any option
    loom's model does not have). ``config_to_hf``: a :class:`ModelConfig` -> ``config.json`` dict.
    ``source``: (parameter name, config) -> its :class:`HFSource`. ``prefixes``: prefixes a checkpoint
    may put before (or leave off) the names ``source`` gives, e.g. older GPT-2 files lack
    ``transformer.``. ``ignore``: ``fnmatch`` patterns of checkpoint tensors with no loom parameter
    (buffers such as a stored causal mask)."""

    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict], dict]
    config_to_hf: Callable[[ModelConfig], dict]
    source: Callable[[str, ModelConfig], HFSource]
    prefixes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the ``model.arch`` value
    build: Callable[[ModelConfig], nn.Module]
    presets: dict[str, dict]
    sharding: Sharding
    pipeline: PipelineSplit
    published_params: dict[str, float] = field(default_factory=dict)  # preset -> parameter count as published
    tasks: tuple[str, ...] = ("causal_lm",)  # what it can be trained for; the first unless train.task says
    n_blocks: Callable[[ModelConfig], int] = lambda cfg: cfg.n_layer  # entries of the block container
    # the position encodings (model.positions) it can use; the first is its own (what auto means)
    positions: tuple[str, ...] = ("learned",)
    validate: Callable[[ModelConfig], None] | None = None  # family-specific config checks (ConfigError)
    # (model, spec, seq) -> ModelCosts; None: loom.models.costs.model_costs, read off the modules
    costs: Callable | None = None
    hf: HFMapping | None = None  # reading and writing Hugging Face model directories; None: not supported
    # why the family cannot split its sequence over tp ranks (parallel.sp); empty: it can
    no_sequence_parallel: str = ""
    # config -> the (last-stage, first-stage) parameter pairs its model ties (PipelineSplit.tied): decided by
    # the family from the config alone (a tied output projection, and whether the head that holds it is built)
    tied: Callable[[ModelConfig], tuple[tuple[str, str], ...]] = lambda cfg: ()
    # modules whose outputs are the classes (sized by model.n_classes): fine-tuning from a run with another
    # class count (train.init_from) initializes them afresh instead of refusing the other shape
    class_heads: tuple[str, ...] = ()
    # why a model of the family cannot run the zero-bubble pipeline schedule; empty: it can
    no_zero_bubble: Callable[[ModelConfig], str] = lambda cfg: ""

    def pipeline_split(self, cfg: ModelConfig) -> PipelineSplit:
        """The pipeline split of the model ``cfg`` builds: the family's ``pipeline`` with the pairs this
        config ties."""
        return replace(self.pipeline, tied=self.tied(cfg))
