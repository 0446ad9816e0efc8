"""Typed, frozen configs for model, training and data, and the `key=value` overrides that edit them.

    cfg = resolve(scale="smoke", overrides=["model.ffn=dense", "model.ffn.activation=relu"])

Override keys are dotted paths into `Config`: `model.d_model=128`, `train.lr=1e-3`,
`data.task=mqar`. Setting a slot (`model.ffn=KIND`, `model.mixer=KIND`) replaces that slot's config
with KIND's defaults; later `model.ffn.<field>=...` overrides edit it. Values are parsed by the
field's type annotation; `Literal[...]` fields list what they allow when given something else.

Hybrids: `model.layers` is a per-layer pattern of mixer kinds (`gla*3+attention`, `gla,gla,attention`
or a preset name from `LAYER_PRESETS`), tiled to `model.n_layers`. Layers of `model.mixer`'s kind use
`model.mixer`; another kind K uses `model.mixers.K.<field>=...` overrides on top of K's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from cfm_jax import registry
from cfm_jax.errors import UserError
from cfm_jax.registry import SlotConfig


def _slot_default(slot: str, kind: str):
    return field(default_factory=lambda: registry.default_config(slot, kind))


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256  # residual stream width (channels per token)
    n_layers: int = 4  # number of blocks
    mixer: SlotConfig = _slot_default("mixer", "attention")  # sequence mixer of every layer
    ffn: SlotConfig = _slot_default("ffn", "dense")  # channel mixer (FFN) of every layer
    use_ffn: bool = True  # false: blocks are x + mixer(norm(x)) only, no FFN (Zoology's MQAR models)
    # Per-layer mixer kinds, tiled to depth; () = `mixer` in every layer. Syntax on the command line:
    # `model.layers=gla*3+attention`, `model.layers=gla,gla,attention` or a preset (`LAYER_PRESETS`).
    # A layer whose kind equals `mixer.kind` uses `mixer`; another kind uses its entry in `mixers`.
    layers: tuple[str, ...] = ()
    # Configs of the other kinds in `layers` (one per kind, sorted by kind), edited on the command line
    # with `model.mixers.KIND.FIELD=VALUE`; a pattern kind without an entry uses its registered defaults.
    mixers: tuple[SlotConfig, ...] = ()
    tie_embeddings: bool = False  # share the token embedding with the output head
    init_std: float = 0.02  # std of the normal init (output projections scaled by 1/sqrt(2*n_layers))
    norm_eps: float = 1e-6  # RMSNorm epsilon
    # Compute dtype: float32, or bfloat16 matmuls and activations with float32 parameters, optimizer
    # state, statistics and loss (cfm_jax/layers/precision.py)
    dtype: Literal["float32", "bfloat16"] = "float32"

    def layer_kinds(self) -> tuple[str, ...]:
        """The mixer kind of each layer, length n_layers."""
        pattern = self.layers or (self.mixer.kind,)
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    def layer_mixer(self, layer: int) -> SlotConfig:
        """The mixer config of one layer: `mixer` for its kind, else the kind's `mixers` entry or defaults."""
        kind = self.layer_kinds()[layer]
        if kind == self.mixer.kind:
            return self.mixer
        for cfg in self.mixers:
            if cfg.kind == kind:
                return cfg
        return registry.default_config("mixer", kind)

    def validate(self) -> None:
        _positive(self, "d_model", "n_layers")
        if self.init_std <= 0 or self.norm_eps <= 0:
            raise UserError("model.init_std and model.norm_eps must be > 0")
        if self.layers and self.n_layers % len(self.layers):
            raise UserError(
                f"model.n_layers={self.n_layers} is not a multiple of the layer pattern length "
                f"{len(self.layers)} ({format_pattern(self.layers)})"
            )
        allowed = registry.kinds("mixer")
        for kind in self.layers:
            if kind not in allowed:
                raise UserError(
                    f"unknown mixer kind {kind!r} in model.layers; allowed: {', '.join(allowed)}; "
                    f"presets: {', '.join(LAYER_PRESETS)}"
                )
        kinds = self.layer_kinds()
        for cfg in self.mixers:
            unused = f"model.mixers.{cfg.kind} is unused: {cfg.kind}"
            if cfg.kind == self.mixer.kind:
                raise UserError(f"{unused} layers use model.mixer (set model.mixer.<field>)")
            if cfg.kind not in kinds:
                raise UserError(f"{unused} is not in model.layers={format_pattern(kinds)}")
        for kind in dict.fromkeys(kinds):
            cfg = self.layer_mixer(kinds.index(kind))
            try:
                cfg.validate(self.d_model)
            except UserError as e:  # slot messages say `model.mixer.`; point at where this kind is set
                if kind == self.mixer.kind:
                    raise
                raise UserError(str(e).replace("model.mixer.", f"model.mixers.{kind}.")) from None
        self.ffn.validate(self.d_model)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps in total (raising it later continues the run)
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warmup from 0 to lr (capped at steps)
    min_lr_ratio: float = 0.1  # cosine decays lr to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms, biases)
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    seed: int = 0  # seeds parameter init and the training data stream
    log_every: int = 10  # write a metrics.jsonl line every this many steps
    checkpoint_every: int = 200  # save a checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 3  # checkpoints kept in workdir/checkpoints (older ones deleted)
    mesh: str = ""  # device mesh, e.g. "data:4,expert:2" (axes: data, expert); "" = one device
    fsdp: bool = False  # with a mesh: also shard dense weight matrices (and their Adam moments) over `data`
    skip_nonfinite: bool = False  # skip (do not apply) steps whose loss or gradient is not finite, instead of stopping
    max_consecutive_skips: int = 20  # with skip_nonfinite: stop after this many non-finite steps in a row
    eval_every: int = 0  # every this many steps, validation loss/accuracy into metrics.jsonl as "eval/SET/NAME" (0 = off)
    tensorboard: bool = True  # also write each metrics.jsonl row as TensorBoard scalars in workdir/tensorboard
    wandb: str = ""  # a Weights & Biases project to log to as well, when the wandb package is installed ("" = off)

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips")
        if not self.lr > 0:
            raise UserError(f"train.lr={self.lr} must be > 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if self.eval_every < 0:
            raise UserError(f"train.eval_every={self.eval_every} must be >= 0 (0 = no validation during training)")
        if not (0 <= self.min_lr_ratio <= 1 and 0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise UserError("train.min_lr_ratio must be in [0, 1]; train.b1, train.b2 in [0, 1)")
        from cfm_jax.sharding import parse_mesh

        parse_mesh(self.mesh)


@dataclass(frozen=True)
class DataConfig:
    """The settings every task has. Each task subclasses this with its own fields, in its own file
    (`MQARConfig` in data/mqar.py, ...), and names the subclass as its `config_cls`; `data.task=NAME`
    selects the task and with it its config class, so `data.FIELD=VALUE` sets a field of that task
    (`cfm-jax list NAME` prints them)."""

    task: str = "text"  # a registered task: `cfm-jax list` shows them (text, mqar, ...)
    seq_len: int = 256  # tokens per training sequence
    vocab_size: int = 8192  # synthetic tasks: token vocabulary (text: set by data.tokenizer)
    effective_threshold: float = 0.856  # eval: RULER's effective length = longest length scoring >= this
    eval_batches: int = 8  # batches (of train.batch_size) per validation / accuracy measurement
    # Context lengths at which eval measures synthetic-task accuracy; () = seq_len, 2x and 4x.
    eval_lengths: tuple[int, ...] = ()

    def lengths(self) -> tuple[int, ...]:
        return self.eval_lengths or (self.seq_len, 2 * self.seq_len, 4 * self.seq_len)

    def validate(self) -> None:
        from cfm_jax import data  # the task registry imports this module

        task = data.get_task_class(self.task)
        if type(self) is not task.config_cls:
            raise UserError(f"data.task={self.task!r} takes a {task.config_cls.__name__}, got a {type(self).__name__}")
        _positive(self, "seq_len", "vocab_size", "eval_batches")
        if not 0 < self.effective_threshold <= 1:
            raise UserError(f"data.effective_threshold={self.effective_threshold} must be in (0, 1]")
        if any(length <= 0 for length in self.eval_lengths):
            raise UserError(f"data.eval_lengths={self.eval_lengths} must all be > 0")
        task.validate(self)


def task_config(name: str, carry: DataConfig | None = None) -> DataConfig:
    """Task `name`'s config at its defaults, with every field it shares with `carry` (the config it
    replaces: seq_len, vocab_size, ... and any task field both have) kept from there."""
    from cfm_jax import data

    cls = data.get_task_class(name).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {} if carry is None else {f.name: getattr(carry, f.name) for f in dataclasses.fields(carry) if f.name in names}
    return cls(**{**kept, "task": name})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: task_config("text"))

    def validate(self) -> "Config":
        _check_finite(self)
        if not 0 <= self.train.seed < 2**32:
            raise UserError(f"train.seed={self.train.seed} must be in [0, 2**32)")
        self.model.validate()
        self.train.validate()
        self.data.validate()
        from cfm_jax.sharding import parse_mesh

        axes = parse_mesh(self.train.mesh)
        for slot_cfg in (self.model.ffn, self.model.mixer, *self.model.mixers):
            slot_cfg.validate_mesh(axes)
        return self


# Named layer patterns for `model.layers=NAME` (usable as items of a pattern too): one period of the
# published hybrid, tiled to model.n_layers, which must be a multiple of its length.
LAYER_PRESETS: dict[str, tuple[str, ...]] = {
    # Jamba (Lieber et al. 2024, arXiv 2403.19887): 1 attention : 7 Mamba, attention at offset 4 of 8.
    "jamba": ("mamba",) * 4 + ("attention",) + ("mamba",) * 3,
    # MiniMax-01 (arXiv 2501.08313): one softmax attention layer after every 7 lightning (linear) layers.
    "minimax": ("linear_attention",) * 7 + ("attention",),
    # Samba (Ren et al. 2024, arXiv 2406.07522): Mamba and sliding-window attention layers alternate.
    "samba": ("mamba", "sliding_window"),
    # Based (Arora et al. 2024, arXiv 2402.18668): Taylor linear attention with a short conv, and
    # small sliding-window attention layers (sliding_window defaults to a 64-token window, as Based).
    "based": ("based_linear", "sliding_window"),
}


def layer_pattern(raw: str) -> tuple[str, ...]:
    """`model.layers` value -> kinds: 'gla*3+attention', 'gla,attention', or presets ('minimax')."""
    return tuple(kind for item in split_pattern(raw) for kind in LAYER_PRESETS.get(item, (item,)))


# Scales are override lists applied before the user's: same code, different sizes.
SCALES: dict[str, tuple[str, ...]] = {
    "smoke": (  # seconds: tests, CI, the demo
        "model.d_model=64", "model.n_layers=2", "data.seq_len=128", "train.batch_size=8",
        "train.steps=50", "train.warmup_steps=10", "train.log_every=5", "train.checkpoint_every=25",
        "data.eval_batches=2",
    ),
    "cpu": (  # minutes on a 2-core laptop
        "model.d_model=256", "model.n_layers=4", "data.seq_len=256", "train.batch_size=16",
        "train.steps=2000", "train.warmup_steps=100",
    ),
    "full": (  # an accelerator
        "model.d_model=768", "model.n_layers=12", "data.seq_len=1024", "train.batch_size=64",
        "train.steps=20000", "train.warmup_steps=1000", "train.lr=6e-4", "train.log_every=50",
        "train.checkpoint_every=1000", "data.eval_batches=32",
    ),
}


def resolve(scale: str = "cpu", overrides: typing.Sequence[str] = (), base: Config | None = None) -> Config:
    """Default config, then the scale's overrides, then the user's, then validation. With `base` (a
    recorded run's config), the user's overrides apply to it and the scale is not used."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    cfg = Config() if base is None else base
    # `data.task=NAME` first: it selects the config class the other data.* fields belong to.
    overrides = sorted(overrides, key=lambda item: not item.replace(" ", "").startswith("data.task="))
    for item in (*(SCALES[scale] if base is None else ()), *overrides):
        cfg = apply_override(cfg, item)
    return cfg.validate()


def apply_override(cfg: Config, item: str) -> Config:
    """Apply one `dotted.key=value` override; errors are one-line UserErrors."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r} is not of the form key=value (e.g. model.d_model=128)")
    return _set(cfg, key.strip().split("."), raw.strip(), key.strip())


def _set(obj: Any, path: list[str], raw: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        prefix = full_key[: len(full_key) - len(".".join(path))]
        allowed = ", ".join(prefix + n for n in names)
        if isinstance(obj, DataConfig):
            from cfm_jax.data import TASKS

            owners = sorted(n for n, t in TASKS.items() if head in {f.name for f in dataclasses.fields(t.config_cls)})
            hint = f" (a field of data.task={' / '.join(owners)})" if owners else ""
            raise UserError(f"unknown key {full_key!r} for data.task={obj.task}{hint}; allowed here: {allowed}")
        raise UserError(f"unknown key {full_key!r}; allowed here: {allowed}")
    if isinstance(obj, DataConfig) and head == "task" and len(path) == 1:
        return task_config(raw, carry=obj)
    current = getattr(obj, head)
    if isinstance(obj, ModelConfig) and head == "mixers":
        return dataclasses.replace(obj, mixers=_set_pattern_mixer(obj.mixers, path[1:], raw, full_key))
    if isinstance(obj, ModelConfig) and head == "layers" and len(path) == 1:
        return dataclasses.replace(obj, layers=layer_pattern(raw))
    if isinstance(current, SlotConfig):
        if len(path) == 1:  # `model.ffn=KIND`: switch kind, reset to its defaults
            return dataclasses.replace(obj, **{head: registry.default_config(current.slot, raw)})
        return dataclasses.replace(obj, **{head: _set(current, path[1:], raw, full_key)})
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise UserError(f"{full_key!r} is a group of settings; set one of its fields, e.g. {full_key}.<field>=...")
        return dataclasses.replace(obj, **{head: _set(current, path[1:], raw, full_key)})
    if len(path) > 1:
        raise UserError(f"unknown key {full_key!r}: {'.'.join(full_key.split('.')[:-len(path) + 1])} has no sub-fields")
    hint = typing.get_type_hints(type(obj))[head]
    return dataclasses.replace(obj, **{head: parse_value(raw, hint, full_key)})


def format_pattern(kinds: typing.Sequence[str]) -> str:
    """Inverse of split_pattern, runs compressed: [a, a, a, b] -> 'a*3+b'."""
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return "+".join(kind if n == 1 else f"{kind}*{n}" for kind, n in runs)


def _set_pattern_mixer(mixers: tuple, path: list[str], raw: str, full_key: str) -> tuple:
    """`model.mixers.KIND.FIELD=VALUE`: edit KIND's entry (created from its defaults) in `mixers`."""
    if len(path) < 2:
        raise UserError(f"{full_key!r}: set one field of a pattern kind, e.g. model.mixers.sliding_window.window=32")
    kind = path[0]
    current = next((cfg for cfg in mixers if cfg.kind == kind), None) or registry.default_config("mixer", kind)
    updated = _set(current, path[1:], raw, full_key)
    return tuple(sorted([cfg for cfg in mixers if cfg.kind != kind] + [updated], key=lambda cfg: cfg.kind))


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse a command-line string by type annotation (int, float, bool, str, Literal, tuple[...])."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if raw not in allowed:
            raise UserError(f"{key}={raw!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return raw
    if origin is tuple:
        (elem, *_rest) = typing.get_args(hint)
        return tuple(parse_value(part, elem, key) for part in split_pattern(raw))
    if hint is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"{key}={raw!r} is not a bool; allowed: true, false")
    if hint in (int, float):
        try:
            value = hint(raw) if hint is float else int(raw, 10)
        except ValueError:
            raise UserError(f"{key}={raw!r} is not {'an int' if hint is int else 'a float'}") from None
        if hint is float and not math.isfinite(value):
            raise UserError(f"{key}={raw!r} is not a finite number")
        return value
    if hint is str:
        return raw
    raise UserError(f"{key}: cannot set a field of type {hint} from the command line")


def split_pattern(raw: str) -> list[str]:
    """'a*3+b' -> [a, a, a, b]; 'a,b' -> [a, b]; '' -> []."""
    items: list[str] = []
    for part in raw.replace(",", "+").split("+"):
        part = part.strip()
        if not part:
            continue
        name, star, count = part.partition("*")
        if star:
            if not (count.strip().isascii() and count.strip().isdigit()) or int(count) < 1:
                raise UserError(f"bad repeat count in {part!r}; write NAME*N with N >= 1")
            items.extend([name.strip()] * int(count))
        else:
            items.append(name)
    return items


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float field of a config (slots and pattern mixers included) must be finite: NaN passes
    every `<` and `>` check, and inf learning rates or scales make every parameter non-finite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item):
                _check_finite(item, f"{prefix}{f.name}.")
            elif isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"{prefix}{f.name}={item} must be a finite number")


def _positive(obj: Any, *names: str) -> None:
    section = {ModelConfig: "model", TrainConfig: "train", DataConfig: "data"}.get(type(obj), "")
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise UserError(f"{section}.{name}={value} must be > 0")


# --- serialization (config.json) ---


def to_dict(obj: Any) -> Any:
    """Config -> JSON-able dict; slot configs carry their `kind`."""
    if dataclasses.is_dataclass(obj):
        out = {"kind": obj.kind} if isinstance(obj, SlotConfig) else {}
        out.update({f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    return obj


def from_dict(d: dict) -> Config:
    """Inverse of to_dict (for a workdir's config.json)."""

    def build(cls: type, values: dict) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value, hint = values[f.name], hints[f.name]
            if hint is SlotConfig or (isinstance(hint, type) and issubclass(hint, SlotConfig)):
                value = slot_config(f.name, value)  # slot fields are named after their slot
            elif f.name in _SLOT_TUPLES:
                value = tuple(slot_config(_SLOT_TUPLES[f.name], item) for item in value)
            elif hint is DataConfig:  # the task's own config class; fields of other tasks (older records) dropped
                from cfm_jax import data

                cls_ = data.get_task_class(value.get("task", "text")).config_cls
                value = build(cls_, {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(cls_)}})
            elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
                value = build(hint, value)
            elif typing.get_origin(hint) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def slot_config(slot: str, values: dict) -> SlotConfig:
        entry = registry.get(slot, values["kind"])
        return build(entry.config_cls, {k: v for k, v in values.items() if k != "kind"})

    return build(Config, d)


_SLOT_TUPLES = {"mixers": "mixer"}  # tuple-of-slot-config fields -> their slot (for from_dict)


def load_config_json(path) -> Config:
    """A run's config.json (a workdir's, with its provenance beside the config, or a bare to_dict)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {str(path)!r} does not exist (give a run's config.json)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--config {str(path)!r} is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {str(path)!r} holds no config object")
    values = data.get("config", data)
    try:
        return from_dict(values)
    except (TypeError, KeyError, AttributeError) as e:
        raise UserError(f"--config {str(path)!r} is not a cfm-jax config ({type(e).__name__}: {e})") from None


def describe_fields(name: str) -> str:
    """`cfm-jax list NAME`: the fields of an ffn/mixer kind, or of model / train / data, one per line
    as `name: type = default  # comment` (comments read from the class source)."""
    import inspect

    from cfm_jax.data import TASKS

    registry.load_plugins()  # a plugin's kinds and tasks are listed too
    sections = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
    if name in sections:
        cls, title = sections[name], f"{name} (set as {name}.FIELD=VALUE)"
        if name == "data":
            title += f"; each task adds its own fields: cfm-jax list TASK ({', '.join(sorted(TASKS))})"
    elif name in TASKS:
        cls = TASKS[name].config_cls
        title = (f"data task {name!r} (select with data.task={name}, set data.FIELD=VALUE); {cls.__module__}."
                 f"{cls.__name__}")
    else:
        slots = [slot for slot in registry.SLOTS if name in registry.kinds(slot)]
        if not slots:
            every = ", ".join(sorted({k for slot in registry.SLOTS for k in registry.kinds(slot)}))
            raise UserError(f"unknown name {name!r}; allowed: model, train, data, a task ({', '.join(sorted(TASKS))}) "
                            f"or a kind: {every}")
        entry = registry.get(slots[0], name)
        cls, title = entry.config_cls, (f"{slots[0]} kind {name!r} (select with model.{slots[0]}={name}, set "
                                        f"model.{slots[0]}.FIELD=VALUE); {entry.module_cls.__module__}")
    comments = {}
    for cls_ in reversed(cls.__mro__):
        try:
            source = inspect.getsource(cls_)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            field, sep, rest = line.strip().partition(":")
            if sep and field.isidentifier() and "#" in rest:
                comments[field] = rest.split("#", 1)[1].strip()
    hints = typing.get_type_hints(cls)
    lines = [title]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        if isinstance(default, SlotConfig):
            default = default.kind
        if f.name == "task" and name in TASKS:
            default = name
        hint = hints[f.name]
        hint = str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))
        comment = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {f.name}: {hint} = {default!r}{comment}")
    return "\n".join(lines)


def diff(a: Config, b: Config) -> list[str]:
    """Flattened `key: a -> b` lines where the two configs differ."""
    flat_a, flat_b = flatten(to_dict(a)), flatten(to_dict(b))
    keys = sorted(set(flat_a) | set(flat_b))
    return [f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in keys if flat_a.get(k) != flat_b.get(k)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
