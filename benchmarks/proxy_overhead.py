"""What the ``openai`` backend costs: the same load sent straight to an upstream and through a qubrid_lab
front server that forwards to it.

One upstream and one front (no model of its own, one ``openai`` catalogue entry) run for the whole benchmark.
The upstream is ``qubrid-lab serve`` with the bundled chat model, or with ``--upstream vllm`` vLLM's OpenAI
server on the same weights (``--vllm-python``: an interpreter with vLLM, e.g. the tests' cached
``~/.cache/qubrid_lab_tests/vllm-env/bin/python``); the front reaches it through the same proxy code a managed
``vllm`` entry uses. ``--with-embedded`` adds our embedded engine as a third side in the same rounds, so
vLLM-through-qubrid_lab and the embedded engine are compared on one machine in one run.

``--upstream triton --triton-python PY`` (an interpreter with ``nvidia-pytriton``, e.g. the tests' cached
``triton-env``) exports SmolLM2 with ``qubrid-lab export triton`` and serves it in a real ``tritonserver``
through PyTriton (``tests/backends/triton_models.py``); "direct" is then tritonclient's own gRPC stream of
the same chat-templated prompt to the ``ensemble`` model, and the front reaches it through a ``triton``
catalogue entry.
Each round sends every concurrency level straight to the upstream and through the front, in turns (the
order alternating between rounds), and the report compares the medians over the rounds: on a shared 2-core
machine single runs vary by more than the proxy's cost. The front's own CPU seconds per 1,000 output tokens
are reported too, since on two cores the proxy competes with the engine for them.

    python benchmarks/proxy_overhead.py
    python benchmarks/proxy_overhead.py --rounds 1 --requests 8 --concurrency 1 16
    python benchmarks/proxy_overhead.py --upstream vllm --vllm-python ~/.cache/qubrid_lab_tests/vllm-env/bin/python \
        --with-embedded
    python benchmarks/proxy_overhead.py --upstream triton \
        --triton-python ~/.cache/qubrid_lab_tests/triton-env/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
from openai import AsyncOpenAI
from serve_throughput import (
    CHAT_MODEL,
    PROMPT,
    ServerResult,
    ServerSpec,
    chat_model_dir,
    console_script,
    free_port,
    machine_description,
    requests_at,
    run_level,
    running_server,
    stop_process_group,
    stream_one,
    vllm_spec,
)

TRITON_MODELS = Path(__file__).parents[1] / "tests" / "backends" / "triton_models.py"
TARGETS = {"tokens_per_s c=16": 0.90, "ttft_p50 c=1 added ms": 5.0}


def front_spec(
    port: int, upstream_port: int, home: Path, catalogue: Path, models_dir: Path, triton_grpc: str | None = None
) -> ServerSpec:
    entry = {
        "id": "team/smol",
        "kind": "chat",
        "backend": "openai",
        "upstream_model": CHAT_MODEL,
        "base_url": f"http://127.0.0.1:{upstream_port}/v1",
    }  # vLLM serves it under the same name
    if triton_grpc:
        entry = {
            "id": "team/smol",
            "kind": "chat",
            "backend": "triton",
            "url": triton_grpc,
            "protocol": "grpc",
            "interface": "tensorrt_llm",
            "triton_model": "ensemble",
            "tokenizer": "bundled:smollm2-135m-instruct",
        }
    catalogue.write_text(json.dumps([entry]))
    (home / "front").mkdir(parents=True, exist_ok=True)  # the Triton entry's tokenizer: the converted SmolLM2
    if not (home / "front" / "models").exists():
        (home / "front" / "models").symlink_to(models_dir, target_is_directory=True)
    return ServerSpec(
        "front",
        [
            console_script("qubrid-lab"),
            "serve",
            "--port",
            str(port),
            "--catalogue-file",
            str(catalogue),
            "--model",
            "team/smol",
        ],
        "team/smol",
        startup_timeout_s=120,
        env={"QUBRID_LAB_HOME": str(home / "front")},
    )


async def measure(url: str, model: str, args: argparse.Namespace, front: psutil.Process | None) -> dict:
    """Every level once against ``url``; with ``front``, that process's CPU seconds per 1,000 tokens too."""
    async with AsyncOpenAI(
        base_url=f"{url}/v1", api_key="benchmark", timeout=args.request_timeout, max_retries=0
    ) as client:
        await stream_one(client, model, args.max_tokens)
        figures = {}
        for concurrency in args.concurrency:
            cpu_before = sum(front.cpu_times()[:2]) if front else 0.0
            level, _ = await run_level(
                client,
                model,
                concurrency,
                requests_at(concurrency, args.requests),
                args.max_tokens,
                args.request_timeout,
            )
            cpu = sum(front.cpu_times()[:2]) - cpu_before if front else None
            figures[concurrency] = {
                "tokens_per_s": level.tokens_per_s,
                "ttft_p50_s": level.ttft_p50_s,
                "itl_p50_s": level.itl_p50_s,
                "front_cpu_s_per_1k_tokens": cpu / level.output_tokens * 1000 if front else None,
            }
        return figures


async def measure_triton(grpc_url: str, args: argparse.Namespace) -> dict:
    """Every level once straight to Triton: tritonclient's gRPC stream of the chat-templated prompt."""
    import numpy as np
    import tritonclient.grpc.aio as triton_aio
    from transformers import AutoTokenizer
    from tritonclient.grpc import InferInput, InferResult

    from qubrid_lab.engine.triton_backend import _final_flagged_stream

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir(args.home))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    client = triton_aio.InferenceServerClient(grpc_url)

    def tensor(name, array, datatype):
        item = InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    async def one() -> tuple[float, float, int]:
        inputs = [
            tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[args.max_tokens]], dtype=np.int32), "INT32"),
            tensor("temperature", np.array([[0.0]], dtype=np.float32), "FP32"),
        ]
        sent, first, tokens = time.perf_counter(), None, 0
        async for response in _final_flagged_stream(client, "ensemble", inputs):
            names = {o.name for o in response.infer_response.outputs}
            result = InferResult(response.infer_response)
            if "text_output" in names and result.as_numpy("text_output").reshape(-1)[0]:
                first = first or time.perf_counter()
            if "num_output_tokens" in names:
                tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        return (first or time.perf_counter()) - sent, tokens

    figures = {}
    for concurrency in args.concurrency:
        slots = asyncio.Semaphore(concurrency)

        async def bounded():
            async with slots:
                return await one()

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded() for _ in range(requests_at(concurrency, args.requests))))
        wall = time.perf_counter() - started
        figures[concurrency] = {
            "tokens_per_s": sum(t for _, t in results) / wall,
            "ttft_p50_s": statistics.median(f for f, _ in results),
            "itl_p50_s": None,
            "front_cpu_s_per_1k_tokens": None,
        }
    return figures


def exported_triton(scratch: Path, home: Path) -> Path:
    """SmolLM2 written out by ``qubrid-lab export triton`` (the converted weights come from ``home``)."""
    export_home = scratch / "export-home"
    export_home.mkdir()
    (export_home / "models").symlink_to(home / "models", target_is_directory=True)
    repository = scratch / "triton-repository"
    subprocess.run(
        [console_script("qubrid-lab"), "--home", str(export_home), "export", "triton", CHAT_MODEL, str(repository)],
        check=True,
        capture_output=True,
    )
    return repository


@contextmanager
def running_triton(python: str, repository: Path, grpc_port: int, log: Path):
    """PyTriton's tritonserver on the exported repository, until the block ends."""
    environment = {
        **os.environ,
        "LD_LIBRARY_PATH": ":".join(
            filter(None, (sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")))
        ),
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [python, str(TRITON_MODELS), str(repository), str(free_port()), str(grpc_port), str(free_port())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "TRITON READY" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Triton did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        stop_process_group(process)


def median_of(rounds: list[dict], concurrency: int, key: str) -> float:
    return statistics.median(r[concurrency][key] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="the upstream's --dtype")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument(
        "--home", type=Path, default=Path.home() / ".qubrid_lab", help="the upstream's home (its converted-model cache)"
    )
    parser.add_argument("--upstream", choices=["qubrid", "vllm", "triton"], default="qubrid")
    parser.add_argument("--triton-python", default=sys.executable, help="an interpreter that has nvidia-pytriton")
    parser.add_argument("--vllm-python", default=sys.executable, help="an interpreter that has vLLM")
    parser.add_argument(
        "--vllm-memory",
        type=float,
        default=0.15,
        help="vLLM's --gpu-memory-utilization (on its CPU build: the share of RAM for its KV cache)",
    )
    parser.add_argument(
        "--with-embedded",
        action="store_true",
        help="also measure our embedded engine (its own server) in the same rounds",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    machine = machine_description()
    print(machine, flush=True)
    upstream_port, front_port, embedded_port = free_port(), free_port(), free_port()
    embedded = ServerSpec(
        "embedded",
        [
            console_script("qubrid-lab"),
            "serve",
            "--port",
            str(embedded_port),
            "--dtype",
            args.dtype,
            "--model",
            CHAT_MODEL,
        ],
        CHAT_MODEL,
        startup_timeout_s=600,
        env={"QUBRID_LAB_HOME": str(args.home)},
    )
    if args.upstream == "vllm":
        upstream = vllm_spec(args.vllm_python, upstream_port, args.home, args.vllm_memory)
    else:
        upstream = ServerSpec(
            "upstream",
            [*embedded.command[:3], str(upstream_port), *embedded.command[4:]],
            CHAT_MODEL,
            startup_timeout_s=600,
            env=embedded.env,
        )
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as servers:
        triton_grpc = None
        if args.upstream == "triton":
            triton_grpc = f"127.0.0.1:{upstream_port}"
            upstream = ServerSpec("triton", [args.triton_python, str(TRITON_MODELS)], "ensemble", 300)
            servers.enter_context(
                running_triton(
                    args.triton_python,
                    exported_triton(Path(scratch), args.home),
                    upstream_port,
                    Path(scratch) / "triton.log",
                )
            )
        else:
            servers.enter_context(
                running_server(upstream, upstream_port, ServerResult("upstream", upstream.command), sample_rss=False)
            )
        if args.with_embedded:
            servers.enter_context(
                running_server(embedded, embedded_port, ServerResult("embedded", embedded.command), sample_rss=False)
            )
        spec = front_spec(
            front_port,
            upstream_port,
            Path(scratch),
            Path(scratch) / "catalogue.json",
            args.home / "models",
            triton_grpc,
        )
        front_result = ServerResult("front", spec.command)
        servers.enter_context(running_server(spec, front_port, front_result, sample_rss=False))
        front_process = psutil.Process(_server_pid(front_port))
        measured: dict[str, list[dict]] = {"direct": [], "proxied": [], "embedded": []}
        for round_index in range(args.rounds):
            sides = [("direct", upstream_port, CHAT_MODEL, None), ("proxied", front_port, "team/smol", front_process)]
            if args.with_embedded:
                sides.append(("embedded", embedded_port, CHAT_MODEL, None))
            for name, port, model, process in sides if round_index % 2 == 0 else reversed(sides):
                if name == "direct" and triton_grpc:
                    figures = asyncio.run(measure_triton(triton_grpc, args))
                else:
                    figures = asyncio.run(measure(f"http://127.0.0.1:{port}", model, args, process))
                measured[name].append(figures)
                print(
                    f"  round {round_index + 1} {name}: "
                    + ", ".join(f"c={c} {f['tokens_per_s']:.1f} tok/s" for c, f in figures.items()),
                    flush=True,
                )
    direct, proxied = measured["direct"], measured["proxied"]
    print(f"\n{machine}\nupstream: {upstream.name}; medians over {args.rounds} round(s)\n")
    print(
        f"{'conc':>4} {'direct tok/s':>13} {'proxied tok/s':>14} {'ratio':>6} {'TTFT p50 direct':>16} "
        f"{'proxied':>8} {'added':>8} {'front CPU s/1k tok':>19}"
    )
    for c in args.concurrency:
        d_tps, p_tps = median_of(direct, c, "tokens_per_s"), median_of(proxied, c, "tokens_per_s")
        d_ttft, p_ttft = median_of(direct, c, "ttft_p50_s"), median_of(proxied, c, "ttft_p50_s")
        print(
            f"{c:>4} {d_tps:>13.1f} {p_tps:>14.1f} {p_tps / d_tps:>5.2f}x {d_ttft * 1000:>14.0f}ms "
            f"{p_ttft * 1000:>6.0f}ms {(p_ttft - d_ttft) * 1000:>+6.1f}ms "
            f"{median_of(proxied, c, 'front_cpu_s_per_1k_tokens'):>19.3f}"
        )
    if args.with_embedded:
        print(
            f"\n{'conc':>4} {'proxied ' + upstream.name + ' tok/s':>22} {'embedded tok/s':>15} {'ratio':>6} "
            f"{'TTFT p50 proxied':>17} {'embedded':>9}"
        )
        for c in args.concurrency:
            p_tps, e_tps = median_of(proxied, c, "tokens_per_s"), median_of(measured["embedded"], c, "tokens_per_s")
            print(
                f"{c:>4} {p_tps:>22.1f} {e_tps:>15.1f} {e_tps / p_tps:>5.2f}x "
                f"{median_of(proxied, c, 'ttft_p50_s') * 1000:>15.0f}ms "
                f"{median_of(measured['embedded'], c, 'ttft_p50_s') * 1000:>7.0f}ms"
            )
    print(
        f"\ntargets: proxied/direct tokens/s at c=16 >= {TARGETS['tokens_per_s c=16']}, "
        f"added TTFT p50 at c=1 <= {TARGETS['ttft_p50 c=1 added ms']} ms"
    )
    return 0


def _server_pid(port: int) -> int:
    """The process listening on ``port`` (the server itself, not the shell around it)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            return connection.pid
    raise RuntimeError(f"nothing listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
