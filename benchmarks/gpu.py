"""On a GPU: prefixtune's flash and SDPA prefix paths against PEFT and the frozen model, in one script.

Made to run as one call on a lent GPU (under 8 minutes on an H200), and to run the same code on CPU
with `--quick` so CI keeps it working. It measures, in bf16 (float32 with `--quick`):
- correctness: the flash path's logits against the SDPA path's on a padded mixed-prefix batch, and
  cached greedy generation against uncached recomputation;
- a training step (time, peak CUDA memory) at 512, 2k and 4k tokens: prefixtune over flash and over
  SDPA, PEFT prefix tuning, and the frozen model backpropagating to its inputs;
- generation tokens/s for the same variants, and a mixed-prefix batch against a one-prefix batch.
Then it writes `benchmarks/results/gpu.json` and regenerates BENCHMARKS.md, whose GPU section names the GPU.
The continuous-batching server is not in it: that scheduler is CPU-measured (issue 17).

    python -m benchmarks.gpu            # on a CUDA machine
    python -m benchmarks.gpu --quick    # the same code on CPU, tiny lengths, writes gpu-quick.json only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import RESULTS
from benchmarks.speed import round_robin, tokens, train_step
from prefixtune import attach
from prefixtune.assets import smollm2_path
from prefixtune.collection import PrefixCollection

PREFIX = 16


def flash_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def load(path: str, attn: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device).eval()


def variants(path: str, device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    import peft

    out = {}
    if flash_available():
        out["prefixtune (flash)"] = attach(load(path, "flash_attention_2", device, dtype), num_virtual_tokens=PREFIX)
    out["prefixtune (sdpa)"] = attach(load(path, "sdpa", device, dtype), num_virtual_tokens=PREFIX)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX)
    out["PEFT prefix tuning"] = peft.get_peft_model(load(path, "sdpa", device, dtype), config)
    out["frozen, no prefix"] = load(path, "sdpa", device, dtype).requires_grad_(False)
    return out


def on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def correctness(path: str, device: str, dtype: torch.dtype) -> dict:
    """Flash against SDPA on a padded mixed-prefix batch; cached greedy against uncached."""
    sdpa = load(path, "sdpa", device, dtype)
    bases = {"sdpa": sdpa}
    if flash_available():
        bases["flash"] = load(path, "flash_attention_2", device, dtype)
    banks = {}
    for name, base in bases.items():
        bank = PrefixCollection(base)
        for i, length in enumerate((4, PREFIX)):
            bank.add(f"p{i}", attach(base, num_virtual_tokens=length, init="random", seed=i))
        banks[name] = bank
    batch = on(tokens(3, 48, seed=2), device)
    batch["attention_mask"][1, :20] = 0  # left padding
    batch["attention_mask"][2, :7] = 0
    rows = ["p0", None, "p1"]
    keep = batch["attention_mask"].bool()
    result: dict = {}
    with torch.no_grad():
        logits = {name: bank(rows, **batch).logits[keep].float() for name, bank in banks.items()}
        if "flash" in logits:
            result["flash_vs_sdpa_max_abs_logit_diff"] = float((logits["flash"] - logits["sdpa"]).abs().max())
            result["flash_vs_sdpa_argmax_agreement"] = float(
                (logits["flash"].argmax(-1) == logits["sdpa"].argmax(-1)).float().mean()
            )
        model = banks["flash" if "flash" in banks else "sdpa"]["p1"]
        one = on(tokens(1, 24, seed=3), device)
        new = 16
        cached = model.generate(**one, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        seq = one["input_ids"]
        for _ in range(new):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    result["cached_equals_uncached_greedy"] = bool(torch.equal(cached, seq))
    return result


def train_rows(path: str, device: str, dtype: torch.dtype, lengths: list[int], repeats: int) -> dict:
    models = variants(path, device, dtype)
    out: dict = {}
    for seq in lengths:
        batch = on(tokens(1, seq), device)
        batch["labels"] = batch["input_ids"]
        steps = {name: train_step(name, model, batch) for name, model in models.items()}
        peaks = {}
        for name, step in steps.items():  # peak memory: each variant's own step, after a warm-up
            step()
            if device == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                synchronize(device)
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20

        def timed(fn):
            def run():
                fn()
                synchronize(device)

            return run

        times = round_robin({n: timed(s) for n, s in steps.items()}, repeats)
        out[str(seq)] = {"step_s": {n: statistics.median(t) for n, t in times.items()}, "peak_step_mb": peaks}
    return out


def generation_rows(path: str, device: str, dtype: torch.dtype, new: int, repeats: int, mixed_shape=(16, 256)) -> dict:
    models = variants(path, device, dtype)
    batch = on(tokens(8, 64, seed=1), device)

    def gen(model):
        def run():
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            synchronize(device)

        return run

    times = round_robin({n: gen(m) for n, m in models.items()}, repeats)
    tok_s = {n: 8 * new / statistics.median(t) for n, t in times.items()}
    base = next(m for n, m in models.items() if n.startswith("prefixtune")).base_model
    bank = PrefixCollection(base)
    for i in range(4):
        bank.add(f"p{i}", attach(base, num_virtual_tokens=PREFIX, init="random", seed=i))
    big = on(tokens(*mixed_shape, seed=4), device)
    mixed_rows = [f"p{i % 4}" for i in range(mixed_shape[0])]

    def forward(rows):
        def run():
            with torch.no_grad():
                bank(rows, **big)
            synchronize(device)

        return run

    one = ["p0"] * mixed_shape[0]
    mixed = round_robin({"one prefix": forward(one), "four prefixes, mixed": forward(mixed_rows)}, repeats)
    return {"generate_tok_s": tok_s, "mixed_batch_s": {n: statistics.median(t) for n, t in mixed.items()}}


def section(r: dict) -> str:
    """This group's part of BENCHMARKS.md (rendered by `benchmarks.report`, which adds the heading and command)."""
    lines = [f"Device: {r['device']}; dtype {r['dtype']}; flash-attn installed: {r['flash']}. SmolLM2-135M, prefix "
             f"{PREFIX}, batch 1 for training.", ""]  # fmt: skip
    lines += ["Correctness: " + ", ".join(f"{k} = {v}" for k, v in r["correctness"].items()), ""]
    names = list(next(iter(r["train"].values()))["step_s"])
    lines += ["| tokens | " + " | ".join(f"{n} step (ms) / peak (MiB)" for n in names) + " |",
              "|---|" + "---|" * len(names)]  # fmt: skip
    for seq, row in r["train"].items():
        cells = [f"{row['step_s'][n] * 1e3:.1f} / {row['peak_step_mb'].get(n, float('nan')):.0f}" for n in names]
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    best = next(n for n in names if n.startswith("prefixtune"))
    lines += ["", "Ratios (step time, peak memory) at each length, for prefixtune's first path (flash where "
              f"flash-attn is installed, else SDPA; here `{best}`):", ""]  # fmt: skip
    for seq, row in r["train"].items():
        s, m = row["step_s"], row["peak_step_mb"]
        peft = f"{s[best] / s['PEFT prefix tuning']:.2f}x time, " + (
            f"{m[best] / m['PEFT prefix tuning']:.2f}x memory" if m else "memory unmeasured")
        frozen = f"{s[best] / s['frozen, no prefix']:.2f}x time"
        lines.append(f"- {seq} tokens: prefixtune/PEFT {peft}; prefixtune/frozen {frozen}")
    lines += ["", "Generation (batch 8, 64-token prompts): " + ", ".join(
        f"{n} {v:.0f} tok/s" for n, v in r["generation"]["generate_tok_s"].items())]  # fmt: skip
    mixed = r["generation"]["mixed_batch_s"]
    lines += ["", "Mixed-prefix forward (one batch of rows, 4 prefixes against 1): " + ", ".join(
        f"{n} {v * 1e3:.1f} ms" for n, v in mixed.items())]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, float32, tiny lengths: a smoke test of the script")
    args = parser.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device (or --quick for the CPU smoke test)")
    device, dtype = ("cpu", torch.float32) if args.quick else ("cuda", torch.bfloat16)
    lengths, repeats, new, mixed = ([32], 1, 2, (4, 32)) if args.quick else ([512, 2048, 4096], 5, 128, (16, 256))
    path = smollm2_path()
    start = time.perf_counter()
    result = {
        "device": "CPU (smoke test)" if args.quick else torch.cuda.get_device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "flash": flash_available(),
        "correctness": correctness(path, device, dtype),
        "train": train_rows(path, device, dtype, lengths, repeats),
        "generation": generation_rows(path, device, dtype, new, repeats, mixed),
    }
    result["wall_s"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("gpu-quick.json" if args.quick else "gpu.json")).write_text(json.dumps(result, indent=2))
    if not args.quick:
        from benchmarks import report

        report.write(Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    print(section(result))
    return result


if __name__ == "__main__":
    main()
