"""Move prefixes between PEFT adapter folders and prefixtune, without retraining.

A PEFT prefix-tuning adapter stores `prompt_embeddings` of shape `[P, layers * 2 * kv_dim]`, which is
our `[P, S, 2, kv_heads, head_dim]` table in the same memory order; a prompt-tuning adapter stores
`[P, hidden]`, which is our soft prompt. Both conventions (positions P..P+n-1, keys before values)
already match, so conversion is a checked reshape. Reading never touches peft's code or pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import nn

from prefixtune import serialization
from prefixtune.config import PrefixConfig
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel

PEFT_CONFIG, PEFT_WEIGHTS = serialization.PEFT_CONFIG, serialization.PEFT_WEIGHTS
METHOD_OF = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification", None: "auto"}
# Keys PEFT writes for these two types; anything else is refused rather than silently ignored.
KNOWN_KEYS = {
    "auto_mapping", "base_model_name_or_path", "encoder_hidden_size", "inference_mode", "init_weights",
    "modules_to_save", "num_attention_heads", "num_layers", "num_transformer_submodules", "num_virtual_tokens",
    "peft_type", "peft_version", "prefix_projection", "revision", "task_type", "token_dim", "prompt_tuning_init",
    "prompt_tuning_init_text", "tokenizer_kwargs", "tokenizer_name_or_path",
}  # fmt: skip


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / PEFT_CONFIG
    if not path.exists():
        raise PrefixTuneError(f"{str(directory)!r} is not a PEFT adapter folder: {PEFT_CONFIG} is missing")
    config = serialization.read_json_object(path)
    kind = config.get("peft_type")
    if kind not in METHOD_OF:
        raise PrefixTuneError(
            f"{path}: peft_type {kind!r} is not a prefix; prefixtune converts PREFIX_TUNING and PROMPT_TUNING "
            "adapters only (LoRA and other adapters change weights, not prefixes)"
        )
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise PrefixTuneError(f"{path}: unknown PEFT config key(s) {unknown}")
    checks = {
        "task_type": config.get("task_type") in TASKS,
        "num_virtual_tokens": isinstance(config.get("num_virtual_tokens"), int) and config["num_virtual_tokens"] > 0,
        "num_transformer_submodules": config.get("num_transformer_submodules", 1) in (1, None),
        "prefix_projection": isinstance(config.get("prefix_projection", False), bool),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise PrefixTuneError(
            f"{path}: unsupported value(s) for {', '.join(f'{k}={config.get(k)!r}' for k in bad)} "
            f"(task_type must be one of {sorted(k for k in TASKS if k)}, num_virtual_tokens a positive integer, "
            "num_transformer_submodules 1: decoder-only models)"
        )
    return config


def from_peft(base_model: nn.Module, directory: str | Path, is_trainable: bool = False) -> PrefixModel:
    """A PEFT PrefixTuning/PromptTuning adapter folder, as a prefixtune `PrefixModel` on `base_model`."""
    directory = Path(directory)
    config = _read_peft_config(directory)
    path = directory / PEFT_WEIGHTS
    # Safetensors adapters only: a PEFT adapter_model.bin is a pickle and is never read.
    weights = serialization.read_safetensors(path, "PEFT adapter file", ["prompt_embeddings"])["prompt_embeddings"]
    method = METHOD_OF[config["peft_type"]]
    prefix_config = PrefixConfig(
        method=method, num_virtual_tokens=config["num_virtual_tokens"], init="zero", task=TASKS[config.get("task_type")]
    )
    model = PrefixModel(base_model, prefix_config, _init=False)
    key = model.prefix.tensor_key
    expected = model.state_tensors()[key].shape
    if weights.numel() != expected.numel() or weights.shape[0] != expected[0]:
        raise PrefixTuneError(
            f"{path}: prompt_embeddings {tuple(weights.shape)} does not fit {type(base_model).__name__} "
            f"({model.layout.identity()['name_or_path'] or 'unnamed'}), which needs {tuple(expected)}"
        )
    model.load_tensors({key: weights.reshape(expected)}, source=str(path))
    if not is_trainable:
        model.requires_grad_(False)
    return model


def _prefix_tuning(model: PrefixModel, weights: Any) -> tuple[Any, dict[str, Any]]:
    slot, layout = model.layout.slots[0], model.layout
    config = dict(
        peft_type="PREFIX_TUNING", token_dim=slot.kv_heads * slot.head_dim, num_attention_heads=slot.kv_heads,
        prefix_projection=False, encoder_hidden_size=layout.hidden_size, init_weights=None,
    )  # fmt: skip
    return weights.reshape(weights.shape[0], -1), config


def _prompt_tuning(model: PrefixModel, weights: Any) -> tuple[Any, dict[str, Any]]:
    config = dict(
        peft_type="PROMPT_TUNING", token_dim=model.layout.hidden_size,
        num_attention_heads=getattr(model.config, "num_attention_heads", None), prompt_tuning_init="RANDOM",
        prompt_tuning_init_text=None, tokenizer_kwargs=None, tokenizer_name_or_path=None,
    )  # fmt: skip
    return weights, config


# A prefix's saved tensor -> the PEFT adapter that holds it; a text prefix has no PEFT counterpart.
EXPORTS = {"prefix": _prefix_tuning, "prompt": _prompt_tuning}


def to_peft(model: PrefixModel, directory: str | Path) -> None:
    """Write `model`'s prefix as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads."""
    cfg, layout = model.prefix_config, model.layout
    export = EXPORTS.get(model.prefix.tensor_key)
    if export is None or not layout.is_causal or model.heads:
        raise PrefixTuneError(
            "PEFT export covers 'prefix' and 'prompt' prefixes on decoder-only models without a task head; "
            f"this one is method {cfg.method!r} on {layout.architecture}"
        )
    if any(c is None for c in model.columns):
        raise PrefixTuneError(f"PEFT prefixes cover every layer; this prefix covers only layers {cfg.layers}")
    weights, config = export(model, model.state_tensors()[model.prefix.tensor_key])
    common = {
        "auto_mapping": None, "base_model_name_or_path": layout.name_or_path or None, "inference_mode": True,
        "modules_to_save": None, "num_layers": layout.num_layers, "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens, "revision": None, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    directory = Path(directory)
    data = safetensors_bytes({"prompt_embeddings": weights.contiguous()}, metadata={"format": "pt"})
    serialization.write_bytes(directory / PEFT_WEIGHTS, data)
    serialization.write_json(directory / PEFT_CONFIG, {**common, **config})


def convert(base_model: nn.Module, source: str | Path, target: str | Path) -> str:
    """Convert in whichever direction `source` needs; returns 'from-peft' or 'to-peft'."""
    source = Path(source)
    if (source / PEFT_CONFIG).exists():
        from_peft(base_model, source).save_pretrained(target)
        return "from-peft"
    to_peft(PrefixModel.from_pretrained(base_model, source), target)
    return "to-peft"
