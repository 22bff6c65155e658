"""``qubrid-lab``: the command line. Each command is a thin caller of a documented function."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qubrid_lab.cli_verbs import add_api_verbs
from qubrid_lab.cli_verbs.connection import add_connection_flags
from qubrid_lab.client.api_errors import QubridLabError
from qubrid_lab.errors import QubridError
from qubrid_lab.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: value for name, value in vars(args).items() if value is not None and name in Settings.model_fields
    }
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from qubrid_lab.server.serve import serve

    serve(_settings(args), allow_open=args.allow_open, owner_pid=args.owner_pid)
    return 0


def _key_store(args: argparse.Namespace):
    from qubrid_lab.storage.db import Database
    from qubrid_lab.storage.keys import KeyStore

    database = Database(_settings(args).database_path)
    database.migrate()
    return KeyStore(database)


def _when(at: float | None) -> str:
    import datetime

    return "-" if at is None else datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")


def cmd_keys_create(args: argparse.Namespace) -> int:
    key, record = _key_store(args).create(
        name=args.name, credits=args.credits, rpm=args.rpm, tpm=args.tpm, admin=args.admin
    )
    print(key)
    credit = "unmetered" if record.credits is None else f"{record.credits} USD of credit"
    print(
        f"key '{record.name}' ({'admin, ' if record.admin else ''}{credit}) created; only its hash is stored, so "
        "copy it now. A running server accepts it at once.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _key_store(args).all(include_revoked=args.all)
    print("name\tprefix\tadmin\tcreated\tlast used\tcredits\tspent\trpm\ttpm\tstatus")
    for key in keys:
        credits = "unmetered" if key.credits is None else f"{key.credits:g}"
        status = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "live"
        print(
            f"{key.name}\t{key.prefix}…\t{'yes' if key.admin else 'no'}\t{_when(key.created_at)}\t"
            f"{_when(key.last_used_at)}\t{credits}\t{key.spent:.6f}\t{key.rpm or '-'}\t{key.tpm or '-'}\t{status}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    record = _key_store(args).revoke(args.key)
    print(
        f"revoked key '{record.name}' ({record.prefix}…); a running server refuses it from its next request",
        file=sys.stderr,
    )
    return 0


def _catalogue(settings: Settings):
    from qubrid_lab.models.catalogue import default_catalogue

    catalogue = default_catalogue()
    if settings.catalogue_file:
        catalogue.load_file(settings.catalogue_file)
    return catalogue


def cmd_models_list(args: argparse.Namespace) -> int:
    from qubrid_lab.engine.openai_upstream import upstream_status
    from qubrid_lab.engine.triton_backend import triton_status
    from qubrid_lab.models.loading import source_status

    settings = _settings(args)
    print("id\tkind\tbackend\tsource\tstatus")
    for entry in _catalogue(settings).entries.values():
        if entry.backend == "openai":
            source, status = f"{entry.base_url} ({entry.upstream_model})", upstream_status(entry)
        elif entry.backend == "triton":
            source = f"{entry.protocol}://{entry.url.split('://')[-1]} ({entry.interface}: {entry.triton_model})"
            status = triton_status(entry)
        else:  # local, and vllm (weights here; vLLM itself starts with the server)
            source, status = entry.source, source_status(entry, settings.model_cache_dir)
            if entry.backend == "vllm":
                from qubrid_lab.engine.vllm_managed import vllm_status

                status += f"; {vllm_status(entry)}"
        print(f"{entry.id}\t{entry.kind}\t{entry.backend}\t{source}\t{status}")
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from qubrid_lab.export.triton import export_triton

    settings = _settings(args)
    model_dir = export_triton(
        settings,
        _catalogue(settings),
        args.model,
        args.out_dir,
        name=args.name,
        decoupled=not args.no_stream,
        max_batch_size=args.max_batch_size,
        gpu=args.gpu,
    )
    print(model_dir)
    print(f"serve it with: tritonserver --model-repository {args.out_dir}", file=sys.stderr)
    return 0


HOME_HELP = "home directory (env QUBRID_LAB_HOME, default ~/.qubrid_lab)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qubrid-lab", description=__doc__)
    parser.add_argument("--home", type=Path, help=HOME_HELP)
    add_connection_flags(parser, default=None)
    # every verb takes --home too (``qubrid-lab serve --home X``); given there, it wins over one before the verb
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=HOME_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the OpenAI-compatible server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        help="catalogue id, model directory, .gguf file or Hub id to load (repeatable)",
    )
    serve.add_argument("--catalogue-file", type=Path, help="JSON list of extra catalogue entries")
    serve.add_argument("--device", help="auto, cpu or cuda[:N]")
    serve.add_argument(
        "--dtype",
        help="auto (measured: fastest accurate), float32, bfloat16, float16, or on a CPU w8a16, w4a16, w4a32 or int8",
    )
    serve.add_argument("--max-batch-size", type=int, help="most sequences decoded together per model")
    serve.add_argument(
        "--prompt-cache-mib",
        type=int,
        help="MiB per chat model kept of recent prompts' keys/values (default 32; 0: off)",
    )
    serve.add_argument("--max-tokens-cap", type=int, help="cap on generated tokens when a request sets none")
    serve.add_argument("--api-key-file", type=Path, help="file of accepted keys, one per line")
    serve.add_argument("--max-dataset-bytes", type=int, help="largest CSV dataset upload (default 100 MB)")
    serve.add_argument("--training-device", help="where fine-tuning jobs train: auto, cpu, cuda or cuda:N")
    serve.add_argument("--max-running-jobs", type=int, help="fine-tuning jobs trained at once (default 1)")
    serve.add_argument(
        "--image-url-hosts",
        help="hosts whose http(s) image URLs are fetched, comma-separated "
        "('*': any public host; default: any public host on loopback, "
        "none beyond)",
    )
    serve.add_argument("--allow-open", action="store_true", help="serve a non-loopback address without keys")
    serve.add_argument("--log-level", help="debug, info, warning")
    serve.add_argument("--owner-pid", type=int, help="stop when this process exits (set by start_server())")
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser("keys", parents=[common], help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", parents=[common], help="create a qbt_ key (printed once; stored hashed)")
    create.add_argument("--name", help="a unique name for the key (default: generated)")
    create.add_argument(
        "--credits", type=float, help="credit in USD; 0 refuses every request with 402 (default: unmetered)"
    )
    create.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    create.add_argument("--tpm", type=int, help="tokens per minute, prompt plus completion (default: no limit)")
    create.add_argument("--admin", action="store_true", help="sees and manages every key's objects and usage")
    create.set_defaults(run=cmd_keys_create)
    listing = key_commands.add_parser("list", parents=[common], help="name, prefix, created, last used, limits, spend")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    listing.set_defaults(run=cmd_keys_list)
    revoke = key_commands.add_parser("revoke", parents=[common], help="refuse a key from now on")
    revoke.add_argument("key", help="the key's name, or its first characters (8 or more), or the whole key")
    revoke.set_defaults(run=cmd_keys_revoke)

    models = commands.add_parser(
        "models", parents=[common], help="the model catalogue (`models` alone is `models list`)"
    )
    models.add_argument("--catalogue-file", type=Path, help="JSON list of extra catalogue entries")
    models.set_defaults(run=cmd_models_list)
    model_commands = models.add_subparsers(dest="models_command")
    listing = model_commands.add_parser(
        "list", parents=[common], help="every catalogue entry: kind, backend, source, status"
    )
    listing.add_argument(
        "--catalogue-file", type=Path, default=argparse.SUPPRESS, help="JSON list of extra catalogue entries"
    )
    listing.set_defaults(run=cmd_models_list)

    export = commands.add_parser("export", parents=[common], help="write a model in another serving stack's format")
    export_commands = export.add_subparsers(dest="export_command", required=True)
    triton = export_commands.add_parser(
        "triton",
        parents=[common],
        help="a Triton model repository (Python backend, TensorRT-LLM ensemble tensors) "
        "for a base or fine-tuned chat model",
    )
    triton.add_argument("model", help="catalogue id or fine-tuned model id (ft:...)")
    triton.add_argument("out_dir", type=Path, help="the model repository to write into (created)")
    triton.add_argument("--name", default="ensemble", help="the Triton model's name (default: ensemble)")
    triton.add_argument(
        "--no-stream",
        action="store_true",
        help="a non-decoupled model: whole answers, usable over HTTP infer (default: decoupled, streamed over gRPC)",
    )
    triton.add_argument("--max-batch-size", type=int, default=8, help="the model config's max_batch_size")
    triton.add_argument("--gpu", action="store_true", help="run the model instance on a GPU (KIND_GPU)")
    triton.add_argument("--catalogue-file", type=Path, help="JSON or TOML list of extra catalogue entries")
    triton.set_defaults(run=cmd_export_triton)
    add_api_verbs(commands, common)
    return parser


def print_error(message: str, param: str | None = None) -> None:
    """``error: <message>`` on stderr, naming the field at fault when the message does not already."""
    field = f" (field: {param})" if param and param not in message else ""
    print(f"error: {message}{field}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QubridError as exc:  # a local refusal (the home, a file, a setting)
        print_error(exc.message, exc.param)
        return 2
    except QubridLabError as exc:  # the server's refusal, or no server
        print_error(exc.message, exc.param)
        if exc.status == 401:
            print(
                "The server refused the API key: pass the right one with --api-key (env QUBRID_LAB_API_KEY).",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (``| head``): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
