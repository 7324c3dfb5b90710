"""What a prefix is: one dataclass for the whole family, validated the same way from code and from JSON."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from prefixtune.errors import PrefixTuneError

METHODS = ("prefix", "prompt", "text")
INITS = ("auto", "random", "zero", "vocab", "text")
REPARAMS = ("none", "mlp")
TASKS = ("auto", "classification", "causal_lm", "seq2seq_lm", "base")
POOLINGS = ("auto", "model", "mean")


def documented(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with help text: the CLI's `--help` and the README read it from there."""
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


@dataclass
class PrefixConfig:
    """Settings of one prefix. Every field carries help text, shown by `prefixtune --help` too."""

    method: str = documented(
        "prefix: learned keys/values in every attention layer (Li & Liang 2021; with a task head this "
        "is P-tuning v2). prompt: a soft prompt at the input embeddings (Lester 2021). text: a fixed "
        "discrete text joined to every input.",
        "prefix",
    )
    num_virtual_tokens: int = documented(
        "Prefix length P. For method 'text' it is the text's token count. Default 16: P-tuning v2 uses 8-20 "
        "for classification, and P = 64 did not beat 16 in this project's classification capacity sweep.",
        16,
    )
    text: str | None = documented(
        "The discrete text. Method 'text' uses it as the prefix; 'prefix' and 'prompt' start from it "
        "(init 'text'): prefix tuning takes the model's own keys/values on it, prompt tuning its embeddings.",
        None,
    )
    init: str = documented(
        "random | zero | vocab (activations or embeddings of sampled vocabulary) | text. 'auto' picks "
        "'text' when a text is given and 'vocab' otherwise: in PEFT's MetaMathQA runs, random init "
        "scored far below both.",
        "auto",
    )
    layers: list[int] | None = documented(
        "Layer indices that get a prefix (method 'prefix'); None means every layer.", None
    )
    reparam: str = documented(
        "none: learn keys/values directly. mlp: learn them through embedding -> Linear -> Tanh -> Linear "
        "(Li & Liang); the MLP is collapsed to plain keys/values for inference.",
        "none",
    )
    reparam_hidden: int = documented("Hidden width of the reparameterisation MLP.", 512)
    task: str = documented(
        "classification | causal_lm | seq2seq_lm | base. 'auto' reads it from the model class. "
        "Classification also trains the model's task head.",
        "auto",
    )
    head_modules: list[str] | None = documented(
        "Top-level module names trained with the prefix (the task head). None: found automatically "
        "for classification (classifier, score, classification_head, ...).",
        None,
    )
    pooling: str = documented(
        "The sentence vector a BERT-style classification head reads. model: the model's own pooler "
        "([CLS] through a dense layer). mean: the mean of the last hidden states over the attended "
        "tokens, the vector sentence-embedding encoders such as all-MiniLM-L6-v2 were trained to give; "
        "their [CLS] pooler was never tuned, so a frozen one reads a weaker signal. auto: mean for a "
        "sentence-transformers folder whose modules.json declares mean pooling, else model.",
        "auto",
    )
    position_offset: bool | None = documented(
        "Put real tokens at positions P..P+n-1, as PEFT and the paper do for decoders. None: on for "
        "decoder-only models, off for encoders.",
        None,
    )
    seed: int = documented("Seed for random and vocabulary initialisation.", 0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("init", self.init, INITS)
        _one_of("reparam", self.reparam, REPARAMS)
        _one_of("task", self.task, TASKS)
        _one_of("pooling", self.pooling, POOLINGS)
        if self.method != "text" and (not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0):
            raise PrefixTuneError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_virtual_tokens > 4096:
            raise PrefixTuneError(f"num_virtual_tokens={self.num_virtual_tokens} is too large (at most 4096)")
        if self.method == "text" and not self.text:
            raise PrefixTuneError("method 'text' needs a non-empty `text`")
        if self.init == "text" and not self.text:
            raise PrefixTuneError("init 'text' needs a non-empty `text`")
        if not isinstance(self.reparam_hidden, int) or not 1 <= self.reparam_hidden <= 65536:
            raise PrefixTuneError(f"reparam_hidden must be an integer in 1..65536, got {self.reparam_hidden!r}")
        if self.layers is not None:
            if not self.layers or not all(isinstance(i, int) for i in self.layers):
                raise PrefixTuneError(f"layers must be a non-empty list of integers, got {self.layers!r}")
        if self.method != "prefix" and self.layers is not None:
            raise PrefixTuneError("`layers` applies to method 'prefix' only")

    @property
    def resolved_init(self) -> str:
        if self.init != "auto":
            return self.init
        return "text" if self.text else "vocab"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PrefixConfig:
        """Build from untrusted JSON: unknown keys and wrong types are errors, never ignored."""
        if not isinstance(data, dict):
            raise PrefixTuneError(f"a prefix config must be a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrefixTuneError(f"unknown prefix config key(s) {unknown}; known keys: {sorted(known)}")
        for key, value in data.items():
            if not _type_ok(value, hints[key]):
                raise PrefixTuneError(f"prefix config key {key!r} has the wrong type: {value!r} ({hints[key]})")
        return cls(**data)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PrefixTuneError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    return isinstance(value, hint)
