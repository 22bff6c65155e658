"""The GPU check of issues 11 and 16, one script for a lent NVIDIA GPU (a few minutes; no network there).

On a model built from SmolLM2-135M's config with random bf16 weights (the bundled checkpoint is too large to
carry), it measures:

1. the device's ceilings: HBM bandwidth (a device-to-device copy, bytes read plus written);
2. one decode step of the embedded engine's fused forward at batch 1, 16 and 64, eager and replayed from a
   CUDA graph (``qubrid_lab.engine.cuda_graphs``), the two checked against each other;
3. the embedded engine end to end (``LocalChatEngine``, continuous batching, bf16) at c = 1, 16, 64, with
   and without graphs, against ``model.generate`` on batches of the same size: tokens/s, TTFT and inter-token
   latency, and the share of the HBM roofline (weights plus the cache read once per decode step); greedy
   answers with and without graphs compared; host synchronisations per decode step;
4. what ``--dtype auto`` picks on the GPU;
5. a LoRA job's training steps through ``qubrid_lab.training.runner.train`` on ``data/mixed_lengths.csv``.

Every section runs on its own: one that fails prints its traceback and the rest go on. The last lines are
the table to record in ``benchmarks/README.md``.

    python benchmarks/gpu_check.py --config DIR --out DIR    # DIR: SmolLM2's config.json and tokenizer files
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

PROMPT = "Write a long story about a dragon who learns to code."
RESULTS: dict = {}
DEVICE = "cuda"  # the sections that can also run on the CPU (a dry run: ``--device cpu``) use this


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name: str):
    def wrap(function):
        def run(*args, **kwargs):
            print(f"\n== {name}", flush=True)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            except Exception:
                traceback.print_exc()
                RESULTS.setdefault("failed", []).append(name)
            finally:
                print(f"   ({time.perf_counter() - started:.1f}s)", flush=True)

        return run

    return wrap


def timed_cuda(function, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``function`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


@section("device")
def describe() -> None:
    import transformers

    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = {
        "gpu": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(RESULTS["device"])


@section("HBM bandwidth")
def bandwidth() -> float:
    source = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    target = torch.empty_like(source)
    seconds = timed_cuda(lambda: target.copy_(source), repeats=10)
    rate = 2 * source.numel() * source.element_size() / seconds
    RESULTS["hbm_bytes_per_s"] = rate
    print(f"copy: {rate / 1e12:.2f} TB/s (read + written)")
    return rate


def build_model(config_dir: Path, folder: Path) -> Path:
    """SmolLM2-135M's architecture with random bf16 weights, saved with the tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, folder / name)
    del model
    return folder


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2  # bf16 keys and values


@section("decode step: eager against a CUDA graph")
def decode_steps(model_dir: Path) -> None:
    from qubrid_lab.engine.auto_precision import prompt_batch
    from qubrid_lab.engine.cuda_graphs import GraphedDecode
    from qubrid_lab.engine.forward import load_causal_lm
    from qubrid_lab.models.device import Precision

    model, forward = load_causal_lm(str(model_dir), Precision(torch.bfloat16), torch.device("cuda"))
    prompt = torch.randint(0, model.config.vocab_size, (96,)).tolist()
    rows_out = {}
    for rows in (1, 16, 64):
        _, kv = prompt_batch(forward, torch.device("cuda"), prompt, rows)
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (rows, 1), device="cuda")
            mask, positions = kv.step_inputs()  # the same step, run again and again: it rewrites one column

            eager_logits = forward(ids, positions, kv, mask).float()
            eager_s = timed_cuda(lambda: forward(ids, positions, kv, mask))
            graphs = GraphedDecode(forward)
            graph_logits = graphs(ids, positions, kv).float()
            torch.cuda.synchronize()
            error = float((graph_logits - eager_logits).norm() / eager_logits.norm())
            agree = float((graph_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean())
            graph_s = timed_cuda(lambda: graphs(ids, positions, kv))
        floor = (weight_bytes(model) + rows * kv.length * kv_bytes_per_token(model.config)) / RESULTS.get(
            "hbm_bytes_per_s", 4.3e12
        )
        rows_out[rows] = {
            "eager_ms": eager_s * 1e3,
            "graph_ms": graph_s * 1e3,
            "graph_vs_eager_rel_error": error,
            "same_argmax": agree,
            "hbm_floor_ms": floor * 1e3,
        }
        print(
            f"batch {rows:>2}: eager {eager_s * 1e3:.2f} ms, graph {graph_s * 1e3:.2f} ms "
            f"({eager_s / graph_s:.1f}x), HBM floor {floor * 1e3:.3f} ms, rel. error {error:.1e}, "
            f"same argmax {agree:.2f}"
        )
    RESULTS["decode_step"] = rows_out


async def engine_level(engine, prompt_ids: list[int], concurrency: int, requests: int, max_tokens: int) -> dict:
    from qubrid_lab.engine.base import Finish, GenerationRun
    from qubrid_lab.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    remaining = list(range(requests))
    ttfts, itls, tokens = [], [], 0

    async def worker():
        nonlocal tokens
        while remaining:
            remaining.pop()
            sent = time.perf_counter()
            run = GenerationRun(engine, [prompt_ids], params, 1, prompt_field="prompt")
            stamps = []
            async for event in run.events():
                stamps.append(time.perf_counter())
                if isinstance(event, Finish):
                    tokens += event.completion_tokens
                    if event.completion_tokens > 1:
                        itls.append((stamps[-1] - stamps[0]) / (event.completion_tokens - 1))
            ttfts.append(stamps[0] - sent)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": statistics.median(ttfts or [math.nan]) * 1e3,
        "itl_p50_ms": statistics.median(itls or [math.nan]) * 1e3,
        "tokens": tokens,
    }


def same_answers(engine, graphs) -> list[int] | None:
    """Greedy answers to 8 prompts with and without graphs: per prompt, how many leading tokens agree (of 32).
    Random weights give flat distributions, so bf16 rounding can flip a near tie: a disagreement after some
    tokens is rounding, one at the first token a bug."""
    from qubrid_lab.engine.base import Delta, Finish, GenerationRun
    from qubrid_lab.engine.sampling import SamplingParams

    if graphs is None:
        return None

    async def answer(ids):
        run = GenerationRun(engine, [ids], SamplingParams(temperature=0.0, max_tokens=32, logprobs=0), 1, "prompt")
        tokens = []
        async for event in run.events():
            if isinstance(event, (Delta, Finish)):
                tokens += [entry.token_id for entry in event.logprobs or []]
        return tokens

    agreed = []
    for seed in range(8):
        ids = torch.randint(3, 40000, (24,), generator=torch.Generator().manual_seed(seed)).tolist()
        with_graphs = asyncio.run(answer(ids))
        engine.scheduler.graphs = None
        eager = asyncio.run(answer(ids))
        engine.scheduler.graphs = graphs
        agreed.append(next((i for i, (a, b) in enumerate(zip(with_graphs, eager)) if a != b), len(eager)))
    print(f"greedy answers, leading tokens equal with and without graphs (of 32): {agreed}")
    return agreed


def count_syncs(engine, prompt_ids: list[int]) -> float:
    """Host synchronisations per decode step (torch's sync debug mode), over one request of 32 tokens."""
    from qubrid_lab.engine.base import GenerationRun
    from qubrid_lab.engine.sampling import SamplingParams

    async def one():
        run = GenerationRun(engine, [prompt_ids], SamplingParams(temperature=0.0, max_tokens=32), 1, "prompt")
        async for _ in run.events():
            pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            asyncio.run(one())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sources: dict[str, int] = {}
    for w in syncs:
        where = f"{Path(w.filename).name}:{w.lineno}"
        sources[where] = sources.get(where, 0) + 1
    print("  sync sites:", dict(sorted(sources.items(), key=lambda item: -item[1])[:8]))
    return len(syncs) / 32


@section("engine against model.generate")
def serving(model_dir: Path, max_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    from qubrid_lab.engine.local import LocalChatEngine
    from qubrid_lab.models.catalogue import ModelEntry

    cache = Path(tempfile.mkdtemp())
    engine = LocalChatEngine(
        ModelEntry("smollm2-random", "chat", f"dir:{model_dir}"), cache, DEVICE, "bfloat16", max_batch_size=64
    )
    engine.scheduler.eos_ids.clear()  # random weights: every answer runs to max_tokens, as model.generate's
    prompt_ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
    asyncio.run(engine_level(engine, prompt_ids, 4, 8, 16))  # warm-up
    per_step_bytes = weight_bytes(engine.model)
    kv_token = kv_bytes_per_token(engine.model.config)
    rate = RESULTS.get("hbm_bytes_per_s", 4.3e12)
    table = {}
    graphs = engine.scheduler.graphs
    for concurrency in (1, 16, 64):
        requests = max(4, 2 * concurrency)
        ours = asyncio.run(engine_level(engine, prompt_ids, concurrency, requests, max_tokens))
        average_length = len(prompt_ids) + max_tokens / 2
        roofline = concurrency / ((per_step_bytes + concurrency * average_length * kv_token) / rate)
        ours["roofline_share"] = ours["tokens_per_s"] / roofline
        table[concurrency] = {"engine": ours, "roofline_tokens_per_s": roofline}
        print(f"engine c={concurrency}: {ours}")
        if graphs is not None:  # the same level with every step eager, for the record
            engine.scheduler.graphs = None
            table[concurrency]["engine_eager"] = asyncio.run(
                engine_level(engine, prompt_ids, concurrency, requests, max_tokens)
            )
            engine.scheduler.graphs = graphs
            print(f"engine c={concurrency}, no graphs: {table[concurrency]['engine_eager']}")
    RESULTS["graphs_recorded"] = graphs.recorded if graphs is not None else None
    RESULTS["answers_agree"] = same_answers(engine, graphs)
    if DEVICE == "cuda":
        RESULTS["syncs_per_decode_step"] = count_syncs(engine, prompt_ids)
        print(f"host syncs per decode step: {RESULTS['syncs_per_decode_step']:.2f}")
    engine.close()
    del engine
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(DEVICE)
    model.eval()
    pad = model.config.eos_token_id
    for concurrency in (1, 16, 64):
        ids = torch.tensor([prompt_ids] * concurrency, device=DEVICE)

        def generate(tokens=max_tokens):
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
            )

        generate(8)
        synchronize()
        runs = []
        for _ in range(3 if concurrency == 1 else 2):
            started = time.perf_counter()
            generate()
            synchronize()
            runs.append(time.perf_counter() - started)
        seconds = statistics.median(runs)
        table[concurrency]["generate"] = {"tokens_per_s": concurrency * max_tokens / seconds}
        table[concurrency]["ratio"] = table[concurrency]["engine"]["tokens_per_s"] / (
            concurrency * max_tokens / seconds
        )
        print(f"generate c={concurrency}: {concurrency * max_tokens / seconds:.0f} tok/s")
    RESULTS["serving"] = table
    shutil.rmtree(cache, ignore_errors=True)


@section("--dtype auto on the GPU")
def auto_pick(model_dir: Path) -> None:
    """What ``--dtype auto`` (the default) measures and picks on this GPU, and one answer from it."""
    from qubrid_lab.engine.local import LocalChatEngine
    from qubrid_lab.models.catalogue import ModelEntry

    cache = Path(tempfile.mkdtemp())
    engine = LocalChatEngine(ModelEntry("smollm2-random", "chat", f"dir:{model_dir}"), cache, DEVICE, "auto")
    try:
        RESULTS["auto"] = engine.precision_choice.summary()
        print(RESULTS["auto"])
        prompt_ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
        print(asyncio.run(engine_level(engine, prompt_ids, 1, 2, 16)))
    finally:
        engine.close()
        shutil.rmtree(cache, ignore_errors=True)


class StepTimes:
    """A progress sink keeping each training step's end time and tokens."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []
        self.losses: list[float] = []

    def on_start(self, total_steps, train_rows, validation_rows):
        pass

    def on_train_step(self, step, epoch, loss, learning_rate, tokens, grad_norm=None, tokens_per_second=None):
        self.steps.append((time.perf_counter(), tokens))
        self.losses.append(loss)

    def on_evaluation(self, step, epoch, validation_loss, token_accuracy=None):
        pass

    def on_checkpoint(self, step, path):
        pass

    def should_stop(self):
        return False

    def save_before_stopping(self):
        return False


@section("LoRA training steps")
def training(model_dir: Path, data: Path, steps: int) -> None:
    from qubrid_lab.data.columns import ColumnPlan
    from qubrid_lab.training.hyperparameters import Hyperparameters
    from qubrid_lab.training.runner import TrainingSpec, train

    output = Path(tempfile.mkdtemp())
    sink = StepTimes()
    hyperparameters = Hyperparameters(
        epochs=100, max_steps=steps, batch_size=8, validation_split=0.0, save_steps=1000, eval_steps=1000
    )
    spec = TrainingSpec(
        str(model_dir), data, ColumnPlan("qa", question="question", answer="answer"), hyperparameters, output, DEVICE
    )
    result = train(spec, sink)
    ends = [at for at, _ in sink.steps]
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    tokens = sum(t for _, t in sink.steps[1:])
    RESULTS["training"] = {
        "batching": result.batching,
        "step_ms_p50": statistics.median(gaps) * 1e3,
        "tokens_per_s": tokens / (ends[-1] - ends[0]),
        "first_loss": sink.losses[0],
        "last_loss": sink.losses[-1],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
    }
    print(RESULTS["training"])
    shutil.rmtree(output, ignore_errors=True)


def summary() -> None:
    print("\n== summary (record in benchmarks/README.md)")
    device = RESULTS.get("device", {})
    print(f"{device.get('gpu')}, torch {device.get('torch')}, transformers {device.get('transformers')}")
    if "hbm_bytes_per_s" in RESULTS:
        print(f"HBM copy: {RESULTS['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    for rows, step in RESULTS.get("decode_step", {}).items():
        print(
            f"decode step batch {rows}: eager {step['eager_ms']:.2f} ms, CUDA graph {step['graph_ms']:.2f} ms, "
            f"HBM floor {step['hbm_floor_ms']:.3f} ms"
        )
    for concurrency, row in RESULTS.get("serving", {}).items():
        ours, eager = row["engine"], row.get("engine_eager", {})
        print(
            f"c={concurrency}: engine {ours['tokens_per_s']:.0f} tok/s (TTFT {ours['ttft_p50_ms']:.1f} ms, "
            f"ITL {ours['itl_p50_ms']:.2f} ms, {100 * ours['roofline_share']:.1f}% of roofline), "
            f"without graphs {eager.get('tokens_per_s', float('nan')):.0f} tok/s "
            f"(ITL {eager.get('itl_p50_ms', float('nan')):.2f} ms), "
            f"generate {row.get('generate', {}).get('tokens_per_s', float('nan')):.0f} tok/s, "
            f"engine / generate {row.get('ratio', float('nan')):.2f}x"
        )
    if RESULTS.get("answers_agree") is not None:
        print(f"greedy answers' leading equal tokens, graphs against eager (of 32): {RESULTS['answers_agree']}")
    if "auto" in RESULTS:
        print(f"--dtype auto: {RESULTS['auto']}")
    if "syncs_per_decode_step" in RESULTS:
        print(f"host syncs per decode step: {RESULTS['syncs_per_decode_step']:.2f}")
    if "training" in RESULTS:
        print(f"LoRA training: {RESULTS['training']}")
    if RESULTS.get("failed"):
        print("FAILED sections:", RESULTS["failed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="SmolLM2's config.json and tokenizer files")
    parser.add_argument("--out", type=Path, default=Path("."), help="where gpu_check.json is written")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "mixed_lengths.csv")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--training-steps", type=int, default=12)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; this check runs on a lent GPU machine (or try --device cpu)")
        return 2
    if DEVICE == "cuda":
        describe()
        bandwidth()
    model_dir = build_model(args.config, Path(tempfile.mkdtemp()) / "smollm2-random")
    if DEVICE == "cuda":
        decode_steps(model_dir)
    serving(model_dir, args.max_tokens)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        auto_pick(model_dir)
    training(model_dir, args.data, args.training_steps)
    summary()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    return 1 if RESULTS.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
