"""Speed and memory on SmolLM2-135M: prefixtune against PEFT, the frozen model and full fine-tuning.

Times: every variant runs alternately in one process (round-robin), so drift in machine load hits
all of them alike; medians and ratios are reported. Memory: each variant in its own process; the
measure compared is the exact peak of tensor memory a training step creates (see
`benchmarks/tensor_memory.py`), with the resident memory above the loaded model (sampled every
2 ms) beside it.

    python -m benchmarks.speed [--quick]
    python -m benchmarks.speed --memory prefixtune --seq 512 [--checkpointing]   # one memory row
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import RESULTS, emit, run_row
from benchmarks.tensor_memory import TensorPeak, existing_tensors
from prefixtune import attach
from prefixtune.assets import smollm2_path

TOP_HALF = "prefixtune, top half of layers"  # not a target row: what a shorter backward pass buys
TRAIN_VARIANTS = ("prefixtune", "PEFT prefix tuning", "frozen, no prefix", "full fine-tuning", TOP_HALF)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_during(fn: Callable[[], None]) -> tuple[float, float]:
    """(seconds, peak RSS above the starting RSS in MiB) of one call."""
    start_rss, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return seconds, max(peak[0], rss_mb()) - start_rss


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def variant(name: str, path: str, prefix: int) -> torch.nn.Module:
    model = load(path)
    if name == "prefixtune":
        return attach(model, num_virtual_tokens=prefix, init="random")
    if name == TOP_HALF:
        n = model.config.num_hidden_layers
        return attach(model, num_virtual_tokens=prefix, init="random", layers=list(range(n // 2, n)))
    if name == "PEFT prefix tuning":
        import peft

        return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix))
    if name in ("frozen, no prefix", "base model"):
        model.requires_grad_(False)
    return model


def train_step(name: str, model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    def step() -> None:
        if name == "frozen, no prefix":  # forward + backward to the inputs
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
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)  # fmt: skip

    return run


def round_robin(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def tokens(batch: int, seq: int, seed: int = 0) -> dict:
    ids = torch.randint(100, 40000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def memory_row(args: argparse.Namespace) -> None:
    """One variant in this process: median step time and peak step memory."""
    model = variant(args.memory, smollm2_path(), args.prefix)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = tokens(args.batch, args.seq)
    batch["labels"] = batch["input_ids"]
    step = train_step(args.memory, model, batch)
    step()  # warm-up: allocator pools and lazy init are not the step's own memory
    with TensorPeak(existing_tensors(model, batch)) as tensors:
        step()
    measured = [peak_during(step) for _ in range(args.repeats)]
    emit({"variant": args.memory, "seq": args.seq, "prefix": args.prefix, "batch": args.batch,
          "checkpointing": args.checkpointing, "step_s": statistics.median(t for t, _ in measured),
          "peak_tensor_mb": tensors.peak_bytes / 2**20, "peak_rss_step_mb": max(m for _, m in measured)})  # fmt: skip


def run_group(quick: bool) -> dict:
    path = smollm2_path()
    batch_size, seq, prefix, gen_batch = 8, 64, 16, 4
    new, repeats = (8, 2) if quick else (48, 7)
    batch = tokens(batch_size, seq)
    batch["labels"] = batch["input_ids"]
    gen_inputs = tokens(gen_batch, 16, seed=1)
    models = {name: variant(name, path, prefix) for name in TRAIN_VARIANTS}
    models["full fine-tuning"].train()  # dropout is 0 in SmolLM2; train() only flags it
    train_times = round_robin({n: train_step(n, m, batch) for n, m in models.items()}, repeats)
    gen_models = {"prefixtune": models["prefixtune"], "PEFT prefix tuning": models["PEFT prefix tuning"],
                  "base model": models["frozen, no prefix"]}  # fmt: skip
    gen_times = round_robin({n: generate(m, gen_inputs, new) for n, m in gen_models.items()}, repeats)
    del models, gen_models
    memory = {}
    for name in TRAIN_VARIANTS:
        memory[name] = run_row("benchmarks.speed", ["--memory", name, "--repeats", "2"])
    ckpt = {}
    long_seq = "128" if quick else "512"
    for flag in ([], ["--checkpointing"]):
        r = run_row("benchmarks.speed", ["--memory", "prefixtune", "--seq", long_seq, "--repeats", "2", *flag])
        ckpt["on" if flag else "off"] = r
    result = {
        "setup": {"batch": batch_size, "seq": seq, "prefix": prefix, "gen_batch": gen_batch, "new_tokens": new,
                  "repeats": repeats, "threads": torch.get_num_threads(), "checkpointing_seq": int(long_seq)},
        "train_step_s": {k: statistics.median(v) for k, v in train_times.items()},
        "train_step_all_s": train_times,
        "generate_tok_s": {k: gen_batch * new / statistics.median(v) for k, v in gen_times.items()},
        "peak_step_memory_mb": {k: v["peak_tensor_mb"] for k, v in memory.items()},
        "peak_rss_step_mb": {k: v["peak_rss_step_mb"] for k, v in memory.items()},
        "checkpointing": ckpt,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("speed-quick.json" if quick else "speed.json")).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("train_step_s", "generate_tok_s", "peak_step_memory_mb")}, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short generation: a smoke test")
    parser.add_argument("--memory", choices=TRAIN_VARIANTS, help="measure one variant's step in this process")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    if args.memory:
        memory_row(args)
        return None
    return run_group(args.quick)


if __name__ == "__main__":
    main()
