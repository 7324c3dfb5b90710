"""Train-step time and generation speed on SmolLM2-135M: prefixtune against PEFT and the bare model.

Variants run alternately in one process (round-robin), so drift in machine load hits all of them
alike; medians and ratios are reported, not single absolute times.

    python -m benchmarks.speed [--quick] [--out results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from prefixtune import attach
from prefixtune.assets import smollm2_path


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_step(model: torch.nn.Module, batch: dict, embeds: bool = False) -> Callable[[], None]:
    def step() -> None:
        if embeds:  # the frozen model with no prefix: forward + backward to the inputs
            inputs = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def generate(model: torch.nn.Module, batch: dict, new_tokens: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens or out.shape[1] == new_tokens

    return run


def round_robin(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, for smoke tests")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT variants")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    path = smollm2_path()
    batch_size, seq, prefix, gen_batch, new = 8, 64, 16, 4, (8 if args.quick else 48)
    repeats = 2 if args.quick else 7
    ids = torch.randint(100, 40000, (batch_size, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    gen_ids = torch.randint(100, 40000, (gen_batch, 16))
    gen_batch_inputs = {"input_ids": gen_ids, "attention_mask": torch.ones_like(gen_ids)}

    base = load(path)
    ours = attach(load(path), num_virtual_tokens=prefix, init="random")
    full = load(path).train()
    for p in base.parameters():
        p.requires_grad_(False)
    train = {
        "prefixtune": train_step(ours, batch),
        "frozen, no prefix": train_step(base, batch, embeds=True),
        "full fine-tuning": train_step(full, batch),
    }
    gen = {"prefixtune": generate(ours, gen_batch_inputs, new), "base model": generate(base, gen_batch_inputs, new)}
    if not args.no_peft:
        import peft

        theirs = peft.get_peft_model(
            load(path), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix)
        )
        train["PEFT prefix tuning"] = train_step(theirs, batch)
        gen["PEFT prefix tuning"] = generate(theirs, gen_batch_inputs, new)
    train_times = round_robin(train, repeats)
    gen_times = round_robin(gen, repeats)
    result = {
        "setup": {
            "batch": batch_size,
            "seq": seq,
            "prefix": prefix,
            "gen_batch": gen_batch,
            "new_tokens": new,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
        "train_step_s": {k: statistics.median(v) for k, v in train_times.items()},
        "generate_tok_s": {k: gen_batch * new / statistics.median(v) for k, v in gen_times.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
