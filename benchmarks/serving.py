"""Serving many prefixes on SmolLM2-135M: mixed-prefix generation, and the HTTP server under load.

(a) Generation, variants run round-robin in one process so load drift hits all alike:
    - one mixed batch of 8 rows with 8 different prefixes,
    - the same batch with one prefix for every row (target: mixed >= 0.95 x its throughput),
    - 8 sequential single-row batches, one per prefix (target: mixed >= 3 x faster).
(b) The live server (`prefixtune.serving`, 4 prefixes + the base model, streamed greedy completions
    through the official openai client, one process per client, max_tokens drawn from 8-64 per
    request), one server process with the dynamic batcher and one with continuous batching:
    requests/s, tokens/s, p50/p95 latency and time to first token at 1, 4 and 16 concurrent clients,
    the schedulers and levels taking turns over two rounds.

    python -m benchmarks.serving [--quick] [--out benchmarks/results/serving.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from benchmarks.speed import round_robin
from prefixtune import attach
from prefixtune.assets import smollm2_path
from prefixtune.collection import PrefixCollection
from prefixtune.serving.app import create_app, running

ROWS = 8
ROUNDS = 2  # the server's client levels take turns this many times
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village,",
    "The main benefit of unit tests is",
    "Translate to French: good morning",
]


def _turn(order: tuple | list, r: int) -> list:
    """Who goes in round `r`, in order: as listed in even rounds, reversed in odd ones, so no one always goes first."""
    return list(order)[:: 1 if r % 2 == 0 else -1]


def _share(r: int, count: int) -> range:
    """Round `r`'s share of `count` requests: the rounds split them into consecutive parts."""
    return range(r * count // ROUNDS, (r + 1) * count // ROUNDS)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was really observed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def generation(path: str, new_tokens: int, prefix_len: int, repeats: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bank = PrefixCollection(model)
    names = [f"p{i}" for i in range(ROWS)]
    for i, name in enumerate(names):
        bank.add(name, attach(model, num_virtual_tokens=prefix_len, init="random", seed=i))
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (ROWS, 16))
    mask = torch.ones_like(ids)
    opts = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}

    def mixed() -> None:
        bank.generate(names, input_ids=ids, attention_mask=mask, **opts)

    def single() -> None:
        bank.generate([names[0]] * ROWS, input_ids=ids, attention_mask=mask, **opts)

    def sequential() -> None:
        for r, name in enumerate(names):
            bank.generate([name], input_ids=ids[r : r + 1], attention_mask=mask[r : r + 1], **opts)

    times = round_robin({"mixed, 8 prefixes": mixed, "one prefix": single, "8 sequential rows": sequential}, repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tokens_per_s": {k: ROWS * new_tokens / t for k, t in median.items()},
        "mixed_vs_single_throughput": median["one prefix"] / median["mixed, 8 prefixes"],
        "mixed_speedup_vs_sequential": median["8 sequential rows"] / median["mixed, 8 prefixes"],
    }


_client = None


SCHEDULERS = ("batch", "continuous")  # the dynamic batcher (the old way) and continuous batching


def _connect(urls: dict[str, str]) -> None:
    """A client process's OpenAI clients, one per server (clients run in their own processes, as real clients
    do, so parsing their streams does not share a server process's interpreter lock)."""
    global _clients
    import httpx
    import openai

    _clients = {
        name: openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                            http_client=httpx.Client(limits=httpx.Limits(keepalive_expiry=1)))  # fmt: skip
        for name, url in urls.items()
    }


def _request(job: tuple[str, str, str, int]) -> tuple[float, float, int]:
    """One streamed greedy completion from one server: (latency, time to first token, completion tokens)."""
    server, model, prompt, max_tokens = job
    start = time.perf_counter()
    first, tokens = None, 0
    options = {"temperature": 0, "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    stream = _clients[server].completions.create(model=model, prompt=prompt, **options)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first if first is not None else float("nan"), tokens


def _serve(path: str, prefixes: str, scheduler: str, max_tokens: int, threads: int, ready: Any) -> None:
    """A server process (`prefixtune serve`'s app) until terminated; its URL and scheduler go to `ready`."""
    limits = {"max_batch_size": 16, "max_wait_ms": 10, "max_tokens_limit": max_tokens, "reload_interval_s": None}
    app = create_app(path, prefixes, served_model_name="smollm2", scheduler=scheduler, num_threads=threads, **limits)
    with running(app, log_level="warning") as url:
        ready.put((scheduler, url, type(app.state.prefixtune.batcher).__name__))
        threading.Event().wait()


def _stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/health", timeout=60).json()["stats"]


def server_load(path: str, max_tokens: tuple[int, int], prefix_len: int, requests: dict[int, int]) -> dict:
    """Streamed greedy completions from 1, 4 and 16 client processes (mixed prefixes, seeded max_tokens) to two
    server processes, one per scheduler. Schedulers and client levels take turns, so a machine that speeds
    up or slows down over minutes moves both schedulers and every level alike; the idle server waits."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        models = ["smollm2"]
        for i in range(4):
            name = f"prefix{i}"
            attach(model, num_virtual_tokens=prefix_len, init="random", seed=i).save_pretrained(Path(tmp) / name)
            models.append(name)
        del model
        ready, urls, results = spawn.Queue(), {}, {}
        stack.callback(ready.close)
        for scheduler in SCHEDULERS:  # one after the other: two models loading at once would only slow both
            args = (path, tmp, scheduler, max_tokens[1], torch.get_num_threads(), ready)  # --threads reaches it
            server = spawn.Process(target=_serve, args=args, daemon=True)
            server.start()
            stack.callback(server.join, 30)
            stack.callback(server.terminate)
            name, urls[name], kind = ready.get(timeout=600)  # loaded and listening
            results[name] = {"scheduler": kind}

        def job(i: int) -> tuple[str, str, int]:
            return models[i % len(models)], PROMPTS[i % len(PROMPTS)], random.Random(i).randint(*max_tokens)

        pools = {c: stack.enter_context(concurrent.futures.ProcessPoolExecutor(c, spawn, _connect, (urls,)))
                 for c in requests}  # fmt: skip
        runs = {s: {c: [] for c in requests} for s in SCHEDULERS}  # (answers, wall, model calls, rows) per round
        for r in range(ROUNDS):
            for clients, count in requests.items():
                share = _share(r, count)
                for scheduler in _turn(SCHEDULERS, r):
                    list(pools[clients].map(_request, [(scheduler, *job(0))] * clients))  # warm-up: all connected
                    before = _stats(urls[scheduler])
                    start = time.perf_counter()
                    done = list(pools[clients].map(_request, [(scheduler, *job(i)) for i in share]))
                    wall = time.perf_counter() - start
                    after = _stats(urls[scheduler])
                    grew = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
                    runs[scheduler][clients].append((done, wall, grew))
        for scheduler, levels in runs.items():
            for clients, rounds in levels.items():
                done = [d for answers, *_ in rounds for d in answers]
                wall = sum(w for _, w, _ in rounds)
                kinds = ("steps", "batches", "rows", "decode_steps", "row_steps", "prefills", "prefill_rows")
                grew = {k: sum(g.get(k, 0) for *_, g in rounds) for k in kinds}
                calls = grew["steps"] + grew["batches"]
                # The model's forwards of either scheduler and the rows they carried: the batcher's `generate`
                # calls (prefill included) step every row to the end of the longest; the continuous scheduler's
                # rows leave when done, and a prompt that did not ride in a step was fed in a forward of its own.
                if scheduler == "batch":
                    steps, row_steps = grew["decode_steps"], grew["row_steps"]
                else:
                    steps, row_steps = grew["steps"] + grew["prefills"], grew["rows"] + grew["prefill_rows"]
                latencies, firsts = [d[0] for d in done], [d[1] for d in done]
                results[scheduler][str(clients)] = {
                    "requests": len(done),
                    "requests_per_s": len(done) / wall,
                    "tokens_per_s": sum(d[2] for d in done) / wall,
                    "p50_s": percentile(latencies, 50),
                    "p95_s": percentile(latencies, 95),
                    "ttft_p50_s": percentile(firsts, 50),
                    "ttft_p95_s": percentile(firsts, 95),
                    "model_calls_per_s": calls / wall,  # decoding steps or generate calls
                    "rows_per_call": grew["rows"] / max(calls, 1),  # rows a step or batch held
                    "decoding_steps": steps,
                    "ms_per_step": 1000 * wall / max(steps, 1),
                    "rows_per_step": row_steps / max(steps, 1),
                    "row_steps_with_a_token": sum(d[2] for d in done) / max(row_steps, 1),
                }
            results[scheduler]["stats"] = _stats(urls[scheduler])
    return results


def _rss_mb() -> float:
    """This process's resident memory now (not its peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def many_prefixes(path: str, count: int, used: int, max_tokens: tuple[int, int], requests: int, clients: int) -> dict:
    """`count` prefixes in the folder; the same streamed load naming one prefix and spread over `used`, the two
    taking turns over `ROUNDS` rounds (half the requests each), so drift over minutes moves both alike."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = attach(model, num_virtual_tokens=16, init="random", seed=0)
        gen = torch.Generator().manual_seed(0)
        for i in range(count):
            with torch.no_grad():
                prefix.prefix.table.copy_(torch.randn(prefix.prefix.table.shape, generator=gen))
            prefix.save_pretrained(Path(tmp) / f"p{i:04d}")
        del model, prefix
        before = _rss_mb()
        start = time.perf_counter()
        app = create_app(path, tmp, served_model_name="smollm2", max_batch_size=16, max_tokens_limit=max_tokens[1],
                         reload_interval_s=None)  # fmt: skip
        result = {"prefixes": count, "used": used, "load_s": time.perf_counter() - start,
                  "rss_mb_before_server": before, "rss_mb_loaded": _rss_mb()}  # fmt: skip
        spawn = multiprocessing.get_context("spawn")
        with running(app, log_level="warning") as url:
            with concurrent.futures.ProcessPoolExecutor(clients, spawn, _connect, ({"one": url},)) as pool:
                loads = {"one prefix": 1, f"{used} prefixes": used}
                totals = {label: [0, 0.0] for label in loads}  # tokens and seconds over the rounds
                list(pool.map(_request, [("one", "p0000", PROMPTS[0], max_tokens[0])] * clients))  # warm-up
                for r in range(ROUNDS):  # the two loads take turns, as the schedulers do
                    for label in _turn(loads, r):
                        share, spread = _share(r, requests), loads[label]
                        jobs = [("one", f"p{i % spread:04d}", PROMPTS[i % len(PROMPTS)],
                                 random.Random(i).randint(*max_tokens)) for i in share]  # fmt: skip
                        start = time.perf_counter()
                        done = list(pool.map(_request, jobs))
                        totals[label][0] += sum(d[2] for d in done)
                        totals[label][1] += time.perf_counter() - start
                for label, (tokens, wall) in totals.items():
                    result[label] = {"tokens_per_s": tokens / wall, "requests_per_s": requests / wall}
        result["rss_mb_after"] = _rss_mb()
        result["spread_vs_one"] = result[f"{used} prefixes"]["tokens_per_s"] / result["one prefix"]["tokens_per_s"]
    return result


def client_levels(runs: dict) -> dict[str, dict]:
    """One scheduler's server rows by client count (its entry also holds the scheduler's name and stats)."""
    return {c: run for c, run in runs.items() if c not in ("scheduler", "stats")}


def table(result: dict) -> str:
    gen = result["generation"]
    lines = ["| generation (8 rows) | tokens/s |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in gen["tokens_per_s"].items()]
    lines += [
        f"| mixed / one-prefix throughput | {gen['mixed_vs_single_throughput']:.2f} x (target >= 0.95) |",
        f"| mixed vs sequential | {gen['mixed_speedup_vs_sequential']:.2f} x faster (target >= 3) |",
        "",
        "| scheduler | clients | requests | requests/s | tokens/s | p50 latency (s) | p95 latency (s) "
        "| first token p50 (s) | first token p95 (s) | rows per call | ms per step | rows per step "
        "| row-steps with a token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    nan = float("nan")
    for scheduler, runs in result["server"].items():
        lines += [
            f"| {scheduler} | {c} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} "
            f"| {r.get('rows_per_call', nan):.2f} | {r.get('ms_per_step', nan):.0f} "
            f"| {r.get('rows_per_step', nan):.2f} | {r.get('row_steps_with_a_token', nan):.2f} |"
            for c, r in client_levels(runs).items()
        ]
    many = result.get("many")
    if many:
        lines += [
            "",
            f"{many['prefixes']} prefixes in the folder, loaded in {many['load_s']:.0f} s; resident memory "
            f"{many['rss_mb_before_server']:.0f} MiB before the server, {many['rss_mb_loaded']:.0f} MiB with every "
            f"prefix loaded, {many['rss_mb_after']:.0f} MiB after the load.",
            "",
            "| 16 clients, continuous | tokens/s | requests/s |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {k} | {v['tokens_per_s']:.1f} | {v['requests_per_s']:.2f} |" for k, v in many.items()
                  if isinstance(v, dict)]  # fmt: skip
        lines += [f"| spread / one | {many['spread_vs_one']:.2f} x (target >= 0.9) | |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test of the script")
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--parts", default="generation,server,many", help="any of generation, server, many "
                        "(1,000 prefixes); a part left out keeps its figures from --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    new_tokens, repeats, prefix_len = (4, 1, 16) if args.quick else (32, 3, 16)
    # 16 requests per client at every level: a level ends with a drain, its last requests running while clients
    # that are done wait, so few requests per client would understate a level's steady throughput (at 8 per
    # client, 16 clients' steps held 12.8 rows on average).
    requests = {1: 2, 4: 4, 16: 16} if args.quick else {1: 16, 4: 64, 16: 256}
    max_tokens = (2, 6) if args.quick else (8, 64)
    parts = args.parts.split(",")
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "rows": ROWS,
            "prefix_len": prefix_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "server_max_tokens": list(max_tokens),
        },
        "generation": generation(path, new_tokens, prefix_len, repeats) if "generation" in parts else old["generation"],
        "server": server_load(path, max_tokens, prefix_len, requests) if "server" in parts else old["server"],
    }
    if "many" in parts:
        # 128 requests name prefix i % 100: every one of the 100 is used, in turns with the one-prefix load
        result["many"] = many_prefixes(path, 40 if args.quick else 1000, 10 if args.quick else 100, max_tokens,
                                       16 if args.quick else 128, 4 if args.quick else 16)  # fmt: skip
    elif "many" in old:
        result["many"] = old["many"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
