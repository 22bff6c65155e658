"""Fine-tuning throughput: one LoRA run through a qubrid_lab job and through a plain peft + Trainer script.

Both train the same model on the same rows with the same LoRA rank, batch size, sequence limit, steps and
seed, so each step trains the same rows on both sides, one after the other, never at once, ``--rounds`` times
in turn (on a shared machine a single pair of runs carries several percent of noise). The data is
``data/mixed_lengths.csv`` unless ``--data`` names another: 320 question/answer rows of 51-425 tokens, spread
as instruction data's are, so padding a batch to its longest row (as the plain script does, with transformers'
default collator) nearly doubles its tokens, and a job's packed batches (the rows end to end, no padding) do
not. Reported side by side: training tokens/s (non-padding tokens of steps 2..N over the time from the end of
step 1 to the end of step N), peak resident memory (the job's worker process tree; the script's process), peak
GPU memory when there is a GPU (nvidia-smi, per process), the seconds from ``POST /jobs`` to the first loss
value, and the ratios against the targets, from each side's median tokens/s and highest peak memory: job
tokens/s >= 1.5x plain, peak memory <= 1.0x, and the final training loss (the last step both logged, the same
rows on both sides) within 2% of the plain run's.

The job's step times are its events' timestamps (milliseconds, written by the worker as each step ends);
``epochs`` is set high so that ``--steps`` alone ends both runs.

    python benchmarks/finetune_throughput.py                        # starts its own server on a free port
    python benchmarks/finetune_throughput.py --steps 300 --rounds 1 --json finetune.json
    python benchmarks/finetune_throughput.py --base-url http://127.0.0.1:8000 --home ~/.qubrid_lab
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil
from serve_throughput import (
    CHAT_MODEL,
    RssSampler,
    ServerResult,
    ServerSpec,
    console_script,
    free_port,
    machine_description,
    running_server,
)

DEFAULT_DATA = Path(__file__).with_name("data") / "mixed_lengths.csv"  # made by data/make_mixed_lengths.py
PLAIN_SCRIPT = Path(__file__).with_name("plain_lora_trainer.py")
TOKENS_TARGET = 1.5  # job tokens/s over plain: at least
MEMORY_TARGET = 1.0  # job peak memory over plain: at most
LOSS_TOLERANCE = 0.02  # job final training loss over plain: within this of 1
FINAL_STATUSES = ("completed", "failed", "cancelled")
SKIPPED = "skipped (--skip)"


@dataclass
class RunResult:
    """What one side measured; ``error`` is set when it could not be run to the end."""

    name: str
    steps: int = 0
    tokens: int = 0
    tokens_per_s: float | None = None
    first_loss_s: float | None = None  # job: from POST /jobs; plain: from the script's start
    peak_rss_gib: float | None = None
    peak_gpu_gib: float | None = None
    losses: dict[int, float] = field(default_factory=dict)  # the steps whose loss was logged
    wall_s: float | None = None
    stolen_cores: float | None = None  # CPU taken by the hypervisor for other guests during the run, in cores
    error: str | None = None
    extra: dict = field(default_factory=dict)


class GpuSampler:
    """Peak GPU memory of a process tree, from ``nvidia-smi`` every half second (absent: nothing measured)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_mib = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None
        if self.available:
            self._thread.start()

    def stop(self) -> float | None:
        if not self.available:
            return None
        self._stopped.set()
        self._thread.join()
        return self.peak_mib / 1024

    def _sample(self) -> None:
        while not self._stopped.wait(0.5):
            try:
                pids = {self.process.pid, *(child.pid for child in self.process.children(recursive=True))}
                listing = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                ).stdout
            except (psutil.NoSuchProcess, subprocess.SubprocessError, OSError):
                return
            used = sum(
                int(memory)
                for pid, memory in (line.split(",") for line in listing.splitlines() if line)
                if int(pid) in pids
            )
            self.peak_mib = max(self.peak_mib, used)


@contextmanager
def memory_of(pid: int):
    """Samples a process tree's RSS and GPU memory while the block runs; yields a dict filled at the end."""
    rss, gpu, peaks = RssSampler(pid, interval_s=0.1), GpuSampler(pid), {}
    try:
        yield peaks
    finally:
        rss.stop()
        peaks["rss_gib"] = rss.take_peak_gib()
        peaks["gpu_gib"] = gpu.stop()


def tokens_per_s(steps: list[tuple[int, float, int]]) -> float | None:
    """Tokens of steps 2..N over the time from step 1's end to step N's, from ``(step, time, tokens)``."""
    if len(steps) < 2:
        return None
    (_, first_time, _), (_, last_time, _) = steps[0], steps[-1]
    return sum(tokens for _, _, tokens in steps[1:]) / (last_time - first_time)


def find_worker(job_id: str, timeout_s: float) -> psutil.Process:
    """The job's worker process (torchrun's, with several GPUs): the topmost one naming the job id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or []
            if job_id in command and "qubrid_lab.training.worker" in command:
                parent = process.parent()
                parent_command = parent.cmdline() if parent else []
                return parent if parent and job_id in parent_command else process
        time.sleep(0.05)
    raise TimeoutError(f"no worker process for {job_id} appeared within {timeout_s:.0f} s")


def run_job(client: httpx.Client, args: argparse.Namespace) -> RunResult:
    """Upload the CSV, start the job, follow its events to the end, and measure its worker."""
    result = RunResult("job")
    upload = client.post(
        "/v1/fine-tuning/datasets", files={"file": (args.data.name, args.data.read_bytes(), "text/csv")}
    )
    upload.raise_for_status()
    body = {
        "base_model": args.model,
        "dataset_id": upload.json()["id"],
        "task_type": "qa",
        "suffix": "bench",
        "hyperparameters": {
            "epochs": 100,
            "max_steps": args.steps,
            "learning_rate": args.learning_rate,
            "validation_split": 0,
            "lora_rank": args.lora_rank,
            "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length,
            "seed": args.seed,
        },
    }
    posted, posted_wall = time.perf_counter(), time.time()
    created = client.post("/v1/fine-tuning/jobs", json=body)
    created.raise_for_status()
    job_id = created.json()["id"]
    steps: list[tuple[int, float, int]] = []
    with memory_of(find_worker(job_id, args.job_timeout).pid) as peaks:
        cursor, status, job = None, "queued", {}
        while True:
            events = client.get(
                f"/v1/fine-tuning/jobs/{job_id}/events", params={"limit": 100, **({"after": cursor} if cursor else {})}
            ).json()
            for event in events["data"]:
                data = event.get("data") or {}
                if "training_loss" in data:
                    # the worker's own clock (ms), written as the step ended; same machine as this script
                    logged = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).timestamp()
                    steps.append((data["step"], logged, data["tokens"]))
                    result.losses[data["step"]] = data["training_loss"]
                    if result.first_loss_s is None:
                        result.first_loss_s = logged - posted_wall
            cursor = events["data"][-1]["id"] if events["data"] else cursor
            if events["has_more"]:
                continue
            if status in FINAL_STATUSES:
                break
            job = client.get(f"/v1/fine-tuning/jobs/{job_id}").json()
            status = job["status"]  # one more pass over the events after the job ends
            if time.perf_counter() - posted > args.job_timeout:
                client.post(f"/v1/fine-tuning/jobs/{job_id}/cancel")
                raise TimeoutError(f"job {job_id} still {status} after {args.job_timeout:.0f} s; cancelled")
            time.sleep(args.poll_interval)
    if status != "completed":
        raise RuntimeError(f"job {job_id} ended {status}: {job.get('error')}")
    result.wall_s = time.perf_counter() - posted
    result.steps, result.tokens = len(steps), sum(tokens for _, _, tokens in steps)
    result.tokens_per_s = tokens_per_s(steps)
    result.peak_rss_gib, result.peak_gpu_gib = peaks["rss_gib"], peaks["gpu_gib"]
    result.extra = {"job_id": job_id, "fine_tuned_model": job.get("fine_tuned_model")}
    return result


def run_plain(model_dir: str, args: argparse.Namespace) -> RunResult:
    """Run ``plain_lora_trainer.py`` in its own process with the job's settings and measure that process."""
    result = RunResult("plain")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "plain.json"
        command = [
            sys.executable,
            str(PLAIN_SCRIPT),
            "--model-dir",
            model_dir,
            "--data",
            str(args.data),
            "--steps",
            str(args.steps),
            "--lora-rank",
            str(args.lora_rank),
            "--batch-size",
            str(args.batch_size),
            "--max-seq-length",
            str(args.max_seq_length),
            "--learning-rate",
            str(args.learning_rate),
            "--seed",
            str(args.seed),
            "--json",
            str(report),
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            with memory_of(process.pid) as peaks:
                output, _ = process.communicate(timeout=args.job_timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            raise RuntimeError(f"the plain script exited with {process.returncode}:\n{output[-3000:]}")
        measured = json.loads(report.read_text())
    result.wall_s = time.perf_counter() - started
    result.steps, result.tokens = measured["steps"], measured["tokens"]
    result.tokens_per_s, result.first_loss_s = measured["tokens_per_s"], measured["first_loss_s"]
    result.losses = {int(step): loss for step, loss in measured["losses"].items()}
    result.peak_rss_gib, result.peak_gpu_gib = peaks["rss_gib"], peaks["gpu_gib"]
    result.extra = {"peak_gpu_allocated_gib": measured["peak_gpu_allocated_gib"]}
    return result


def base_model_dir(home: Path, model: str) -> str:
    """The from_pretrained directory the server's worker trains ``model`` from (converted once, then cached)."""
    from qubrid_lab.models.catalogue import default_catalogue
    from qubrid_lab.models.loading import weights_location
    from qubrid_lab.settings import Settings

    return weights_location(default_catalogue().get(model), Settings(home=home).model_cache_dir)


def attempt(name: str, measure) -> RunResult:
    """Run one side; a failure is recorded in its result so that the other side's numbers still print."""
    print(f"running {name} ...", flush=True)
    before, started = psutil.cpu_times(), time.perf_counter()
    try:
        result = measure()
    except Exception as error:  # noqa: BLE001  (reported; the other side still runs)
        result = RunResult(name, error=f"{type(error).__name__}: {error}")
        print(f"  {name} failed: {result.error}", flush=True)
    # CPU time the hypervisor gave to other guests meanwhile: a noisy neighbour shows here, not in our counters
    stolen = getattr(psutil.cpu_times(), "steal", 0.0) - getattr(before, "steal", 0.0)
    result.stolen_cores = stolen / (time.perf_counter() - started)
    return result


def final_losses(job: RunResult, plain: RunResult) -> tuple[int, float, float] | None:
    """The last step both sides logged a loss for, and their losses there (the same rows on both sides)."""
    shared = set(job.losses) & set(plain.losses)
    if not shared:
        return None
    step = max(shared)
    return step, job.losses[step], plain.losses[step]


def ratio_rows(job: RunResult, plain: RunResult) -> list[dict]:
    rows = []
    for metric, bound, higher_is_better in (
        ("tokens_per_s", TOKENS_TARGET, True),
        ("peak_rss_gib", MEMORY_TARGET, False),
        ("peak_gpu_gib", MEMORY_TARGET, False),
    ):
        ours, reference = getattr(job, metric), getattr(plain, metric)
        if ours is None or not reference:
            continue
        ratio = ours / reference
        met = ratio >= bound if higher_is_better else ratio <= bound
        rows.append(
            {
                "metric": metric,
                "ratio": ratio,
                "target": f"{'>=' if higher_is_better else '<='} {bound}",
                "verdict": "PASS" if met else "FAIL",
            }
        )
    final = final_losses(job, plain)
    if final and final[2]:
        ratio = final[1] / final[2]
        rows.append(
            {
                "metric": f"final_loss (step {final[0]})",
                "ratio": ratio,
                "target": f"1 ± {LOSS_TOLERANCE}",
                "verdict": "PASS" if abs(ratio - 1) <= LOSS_TOLERANCE else "FAIL",
            }
        )
    return rows


def print_report(
    machine: str,
    args: argparse.Namespace,
    rounds: list[tuple[RunResult, RunResult]],
    job: RunResult,
    plain: RunResult,
    rows: list[dict],
) -> None:
    def show(value, unit="", digits=2):
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    def line(label: str, run: RunResult) -> None:
        if run.error:
            print(f"{label:<15}{run.error.splitlines()[0]}")
            return
        print(
            f"{label:<15}{run.steps:>6}{run.tokens:>9}{show(run.tokens_per_s, digits=1):>9}"
            f"{show(run.peak_rss_gib, ' G'):>10}{show(run.peak_gpu_gib, ' G'):>10}"
            f"{show(run.first_loss_s, ' s', 1):>10}{show(run.wall_s, ' s', 1):>8}{show(run.stolen_cores):>8}"
        )

    print(f"\n{machine}")
    print(
        f"{args.model} on {args.data.name}: LoRA r={args.lora_rank}, batch {args.batch_size}, "
        f"max_seq_length {args.max_seq_length}, {args.steps} steps, seed {args.seed}, "
        f"job polled every {args.poll_interval} s\n"
    )
    print(
        f"{'run':<15}{'steps':>6}{'tokens':>9}{'tok/s':>9}{'peak RSS':>10}{'peak GPU':>10}"
        f"{'1st loss':>10}{'wall':>8}{'stolen':>8}"
    )
    if len(rounds) > 1:
        for number, (job_run, plain_run) in enumerate(rounds, 1):
            line(f"job #{number}", job_run)
            line(f"plain #{number}", plain_run)
        print(f"{'':-<85}")
    suffix = " (median)" if len(rounds) > 1 else ""
    line("job" + suffix, job)
    line("plain" + suffix, plain)
    print("\n1st loss: seconds to the first loss value, the job's from POST /jobs, the script's from its start.")
    print("stolen: CPU the hypervisor gave other guests during the run, in cores (a noisy neighbour; repeat the run).")
    if len(rounds) > 1:
        print("Medians of tokens/s, 1st loss and wall time; the highest peak memory of each side's runs.")
    shared = sorted(set(job.losses) & set(plain.losses))
    if shared:
        step, gap = shared[-1], max(abs(job.losses[step] - plain.losses[step]) for step in shared)
        print(
            f"Same training? losses at the {len(shared)} steps both logged differ by at most {gap:.4f} "
            f"(step {step}: job {job.losses[step]:.4f}, plain {plain.losses[step]:.4f})"
        )
    print("\nRatios (job / plain):")
    for row in rows:
        print(f"  {row['metric']:<24}{row['ratio']:>7.3f}x  {row['target']:<9} {row['verdict']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running qubrid_lab server (default: start one on a free port)")
    parser.add_argument("--api-key", default=os.environ.get("QUBRID_LAB_API_KEY"), help="bearer key, if required")
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("QUBRID_LAB_HOME", Path.home() / ".qubrid_lab")),
        help="qubrid_lab home: the started server's QUBRID_LAB_HOME and the converted-model cache",
    )
    parser.add_argument("--model", default=CHAT_MODEL, help="catalogue id of the base model")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="a question/answer CSV (default: data/mixed_lengths.csv)"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between polls of the job (1 s is how often the TrainingMonitor widget polls)",
    )
    parser.add_argument("--job-timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run job and plain script this many times, alternately; medians are compared",
    )
    parser.add_argument("--skip", choices=("job", "plain"), help="run one side only")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    return args


def one_round(args: argparse.Namespace, number: int) -> tuple[RunResult, RunResult]:
    """The job, then the plain script; the server (if this script starts one) is stopped before the script runs."""
    label = f" (round {number} of {args.rounds})" if args.rounds > 1 else ""
    if args.base_url:
        server, base_url = nullcontext(), args.base_url.rstrip("/")
    else:
        port = free_port()
        spec = ServerSpec(
            "ours",
            [console_script("qubrid-lab"), "serve", "--port", str(port)],
            args.model,
            startup_timeout_s=300,
            env={"QUBRID_LAB_HOME": str(args.home)},
        )
        # Only the job's worker is measured; a second sampler on the server's tree would cost the job alone.
        server = running_server(spec, port, ServerResult("ours", spec.command), sample_rss=False)
        base_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.skip == "job":
        job = RunResult("job", error=SKIPPED)
    else:
        with server, httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            job = attempt("job" + label, lambda: run_job(client, args))
    # The plain run starts after the server is gone, so the two never share the machine.
    plain = (
        RunResult("plain", error=SKIPPED)
        if args.skip == "plain"
        else attempt("plain" + label, lambda: run_plain(base_model_dir(args.home, args.model), args))
    )
    return job, plain


def combine(name: str, runs: list[RunResult]) -> RunResult:
    """One side over all rounds: median tokens/s and time to first loss, the highest peak memory."""
    done = [run for run in runs if run.error is None]
    if not done:
        return runs[0]

    def median(values):
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else None

    def highest(values):
        values = [value for value in values if value is not None]
        return max(values) if values else None

    return RunResult(
        name,
        steps=done[0].steps,
        tokens=done[0].tokens,
        tokens_per_s=median(run.tokens_per_s for run in done),
        first_loss_s=median(run.first_loss_s for run in done),
        peak_rss_gib=highest(run.peak_rss_gib for run in done),
        peak_gpu_gib=highest(run.peak_gpu_gib for run in done),
        losses=done[0].losses,
        wall_s=median(run.wall_s for run in done),
        stolen_cores=median(run.stolen_cores for run in done),
    )  # over the runs that finished; the per-round lines show any that failed


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop a started server too
    machine = machine_description()
    print(machine, flush=True)
    rounds = [one_round(args, number) for number in range(1, args.rounds + 1)]
    jobs, plains = [job for job, _ in rounds], [plain for _, plain in rounds]
    job, plain = combine("job", jobs), combine("plain", plains)
    rows = ratio_rows(job, plain)
    print_report(machine, args, rounds, job, plain, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "settings": {key: str(value) for key, value in vars(args).items()},
                    "rounds": [{"job": asdict(j), "plain": asdict(p)} for j, p in rounds],
                    "job": asdict(job),
                    "plain": asdict(plain),
                    "ratios": rows,
                },
                indent=2,
            )
        )
    failed = [run for run in jobs + plains if run.error not in (None, SKIPPED)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
