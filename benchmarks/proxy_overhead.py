"""What the ``openai`` backend costs: the same load sent straight to an upstream and through a qubrid_lab
front server that forwards to it.

One upstream and one front (no model of its own, one ``openai`` catalogue entry) run for the whole benchmark.
The upstream is ``qubrid-lab serve`` with the bundled chat model, or with ``--upstream vllm`` vLLM's OpenAI
server on the same weights (``--vllm-python``: an interpreter with vLLM, e.g. the tests' cached
``~/.cache/qubrid_lab_tests/vllm-env/bin/python``); the front reaches it through the same proxy code a managed
``vllm`` entry uses. ``--with-embedded`` adds our embedded engine as a third side in the same rounds, so
vLLM-through-qubrid_lab and the embedded engine are compared on one machine in one run.
Each round sends every concurrency level straight to the upstream and through the front, in turns (the
order alternating between rounds), and the report compares the medians over the rounds: on a shared 2-core
machine single runs vary by more than the proxy's cost. The front's own CPU seconds per 1,000 output tokens
are reported too, since on two cores the proxy competes with the engine for them.

    python benchmarks/proxy_overhead.py
    python benchmarks/proxy_overhead.py --rounds 1 --requests 8 --concurrency 1 16
    python benchmarks/proxy_overhead.py --upstream vllm --vllm-python ~/.cache/qubrid_lab_tests/vllm-env/bin/python \
        --with-embedded
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psutil
from openai import AsyncOpenAI

from serve_throughput import (
    CHAT_MODEL,
    chat_model_dir,
    ServerResult,
    ServerSpec,
    console_script,
    free_port,
    machine_description,
    requests_at,
    run_level,
    running_server,
    stream_one,
)

TARGETS = {"tokens_per_s c=16": 0.90, "ttft_p50 c=1 added ms": 5.0}


def front_spec(port: int, upstream_port: int, home: Path, catalogue: Path) -> ServerSpec:
    catalogue.write_text(json.dumps([{"id": "team/smol", "kind": "chat", "backend": "openai",
                                      "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                                      "upstream_model": CHAT_MODEL}]))  # vLLM serves it under the same name
    return ServerSpec("front", [console_script("qubrid-lab"), "serve", "--port", str(port), "--catalogue-file",
                                str(catalogue), "--model", "team/smol"], "team/smol", startup_timeout_s=120,
                      env={"QUBRID_LAB_HOME": str(home / "front")})


async def measure(url: str, model: str, args: argparse.Namespace, front: psutil.Process | None) -> dict:
    """Every level once against ``url``; with ``front``, that process's CPU seconds per 1,000 tokens too."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="benchmark", timeout=args.request_timeout,
                           max_retries=0) as client:
        await stream_one(client, model, args.max_tokens)
        figures = {}
        for concurrency in args.concurrency:
            cpu_before = sum(front.cpu_times()[:2]) if front else 0.0
            level, _ = await run_level(client, model, concurrency, requests_at(concurrency, args.requests),
                                       args.max_tokens, args.request_timeout)
            cpu = sum(front.cpu_times()[:2]) - cpu_before if front else None
            figures[concurrency] = {"tokens_per_s": level.tokens_per_s, "ttft_p50_s": level.ttft_p50_s,
                                    "itl_p50_s": level.itl_p50_s,
                                    "front_cpu_s_per_1k_tokens": cpu / level.output_tokens * 1000 if front else None}
        return figures


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
    parser.add_argument("--home", type=Path, default=Path.home() / ".qubrid_lab",
                        help="the upstream's home (its converted-model cache)")
    parser.add_argument("--upstream", choices=["qubrid", "vllm"], default="qubrid")
    parser.add_argument("--vllm-python", default=sys.executable, help="an interpreter that has vLLM")
    parser.add_argument("--vllm-memory", type=float, default=0.15,
                        help="vLLM's --gpu-memory-utilization (on its CPU build: the share of RAM for its KV cache)")
    parser.add_argument("--with-embedded", action="store_true",
                        help="also measure our embedded engine (its own server) in the same rounds")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    machine = machine_description()
    print(machine, flush=True)
    upstream_port, front_port, embedded_port = free_port(), free_port(), free_port()
    embedded = ServerSpec("embedded", [console_script("qubrid-lab"), "serve", "--port", str(embedded_port),
                                       "--dtype", args.dtype, "--model", CHAT_MODEL], CHAT_MODEL,
                          startup_timeout_s=600, env={"QUBRID_LAB_HOME": str(args.home)})
    if args.upstream == "vllm":
        upstream = ServerSpec("vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                       chat_model_dir(args.home), "--served-model-name", CHAT_MODEL, "--host",
                                       "127.0.0.1", "--port", str(upstream_port), "--gpu-memory-utilization",
                                       str(args.vllm_memory), "--max-model-len", "2048"], CHAT_MODEL,
                              startup_timeout_s=900)
    else:
        upstream = ServerSpec("upstream", [*embedded.command[:3], str(upstream_port), *embedded.command[4:]],
                              CHAT_MODEL, startup_timeout_s=600, env=embedded.env)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as servers:
        servers.enter_context(running_server(upstream, upstream_port, ServerResult("upstream", upstream.command),
                                             sample_rss=False))
        if args.with_embedded:
            servers.enter_context(running_server(embedded, embedded_port, ServerResult("embedded", embedded.command),
                                                 sample_rss=False))
        spec = front_spec(front_port, upstream_port, Path(scratch), Path(scratch) / "catalogue.json")
        front_result = ServerResult("front", spec.command)
        servers.enter_context(running_server(spec, front_port, front_result, sample_rss=False))
        front_process = psutil.Process(_server_pid(front_port))
        measured: dict[str, list[dict]] = {"direct": [], "proxied": [], "embedded": []}
        for round_index in range(args.rounds):
            sides = [("direct", upstream_port, CHAT_MODEL, None), ("proxied", front_port, "team/smol", front_process)]
            if args.with_embedded:
                sides.append(("embedded", embedded_port, CHAT_MODEL, None))
            for name, port, model, process in sides if round_index % 2 == 0 else reversed(sides):
                figures = asyncio.run(measure(f"http://127.0.0.1:{port}", model, args, process))
                measured[name].append(figures)
                print(f"  round {round_index + 1} {name}: " + ", ".join(
                    f"c={c} {f['tokens_per_s']:.1f} tok/s" for c, f in figures.items()), flush=True)
    direct, proxied = measured["direct"], measured["proxied"]
    print(f"\n{machine}\nupstream: {upstream.name}; medians over {args.rounds} round(s)\n")
    print(f"{'conc':>4} {'direct tok/s':>13} {'proxied tok/s':>14} {'ratio':>6} {'TTFT p50 direct':>16} "
          f"{'proxied':>8} {'added':>8} {'front CPU s/1k tok':>19}")
    for c in args.concurrency:
        d_tps, p_tps = median_of(direct, c, "tokens_per_s"), median_of(proxied, c, "tokens_per_s")
        d_ttft, p_ttft = median_of(direct, c, "ttft_p50_s"), median_of(proxied, c, "ttft_p50_s")
        print(f"{c:>4} {d_tps:>13.1f} {p_tps:>14.1f} {p_tps / d_tps:>5.2f}x {d_ttft * 1000:>14.0f}ms "
              f"{p_ttft * 1000:>6.0f}ms {(p_ttft - d_ttft) * 1000:>+6.1f}ms "
              f"{median_of(proxied, c, 'front_cpu_s_per_1k_tokens'):>19.3f}")
    if args.with_embedded:
        print(f"\n{'conc':>4} {'proxied ' + upstream.name + ' tok/s':>22} {'embedded tok/s':>15} {'ratio':>6} "
              f"{'TTFT p50 proxied':>17} {'embedded':>9}")
        for c in args.concurrency:
            p_tps, e_tps = median_of(proxied, c, "tokens_per_s"), median_of(measured["embedded"], c, "tokens_per_s")
            print(f"{c:>4} {p_tps:>22.1f} {e_tps:>15.1f} {e_tps / p_tps:>5.2f}x "
                  f"{median_of(proxied, c, 'ttft_p50_s') * 1000:>15.0f}ms "
                  f"{median_of(measured['embedded'], c, 'ttft_p50_s') * 1000:>7.0f}ms")
    print(f"\ntargets: proxied/direct tokens/s at c=16 >= {TARGETS['tokens_per_s c=16']}, "
          f"added TTFT p50 at c=1 <= {TARGETS['ttft_p50 c=1 added ms']} ms")
    return 0


def _server_pid(port: int) -> int:
    """The process listening on ``port`` (the server itself, not the shell around it)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            return connection.pid
    raise RuntimeError(f"nothing listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
