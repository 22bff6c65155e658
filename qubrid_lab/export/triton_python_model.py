"""A Triton Inference Server Python-backend model that serves a causal LM with the tensor interface of
TensorRT-LLM's ``ensemble`` model, so clients written for a TensorRT-LLM deployment can use it.

``qubrid-lab export triton`` copies this file, unchanged, into a model repository as ``<model>/1/model.py``
beside the weights (``<model>/1/weights``); it needs only torch, transformers and numpy in the Python
backend's environment, not qubrid_lab. Inputs: ``text_input`` (the prompt text, chat template applied by the
client), ``max_tokens`` and, optionally, ``temperature``, ``top_p``, ``random_seed``, ``stop_words``,
``presence_penalty``, ``frequency_penalty``, ``stream``. Outputs: ``text_output`` (in a decoupled model,
each response carries the new text) and, beyond the ensemble's, ``finish_reason``, ``num_input_tokens`` and
``num_output_tokens`` so clients need not count tokens themselves.

Requests run one at a time on the model instance (one decode loop, no batching): the repository is for
moving a model to a Triton deployment and checking it there, not for serving it fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class Generator:
    """Greedy or sampled decoding with a KV cache, stop strings, and OpenAI's presence/frequency penalties."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def stream(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_words: list[str] = (),
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ):
        """Yields new text as it is decoded, then one final ``(finish_reason, prompt_tokens, completion_tokens)``
        tuple. Text that could be the start of a stop word is held back until it cannot."""
        prompt_ids = self.prompt_tokens(prompt)
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
        counts = torch.zeros(self.model.config.vocab_size, device=self.device)
        stop_words = [word for word in stop_words if word]
        hold = max((len(word) for word in stop_words), default=1) - 1
        input_ids, past = torch.tensor([prompt_ids], device=self.device), None
        generated: list[int] = []
        emitted, reason, stopped_by_word = 0, "length", False
        for _ in range(max_tokens):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float() - frequency_penalty * counts - presence_penalty * (counts > 0).float()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    ordered, order = probs.sort(descending=True)
                    ordered[(ordered.cumsum(-1) - ordered) >= top_p] = 0.0
                    probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in self.eos_ids:
                reason = "stop"
                break
            generated.append(token)
            counts[token] += 1
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cuts = [i for i in (text.find(word, max(0, emitted - hold)) for word in stop_words) if i >= 0]
            if cuts:
                if min(cuts) > emitted:
                    yield text[emitted : min(cuts)]
                emitted, reason, stopped_by_word = min(cuts), "stop", True
                break
            ready = len(text) - hold if not text.endswith("\ufffd") else emitted
            if ready > emitted:
                yield text[emitted:ready]
                emitted = ready
            input_ids = torch.tensor([[token]], device=self.device)
        if not stopped_by_word:  # what was held back (a possible stop word's start) is text after all
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if len(text) > emitted:
                yield text[emitted:]
        yield reason, len(prompt_ids), len(generated)


def read_request(get) -> dict:
    """The generation settings of one request; ``get(name)`` returns an input's numpy array or None."""

    def scalar(name, default, kind):
        value = get(name)
        return default if value is None else kind(np.asarray(value).reshape(-1)[0])

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    stop = get("stop_words")
    return {
        "prompt": text(np.asarray(get("text_input")).reshape(-1)[0]),
        "max_tokens": scalar("max_tokens", 64, int),
        "temperature": scalar("temperature", 1.0, float),
        "top_p": scalar("top_p", 1.0, float),
        "seed": scalar("random_seed", None, int),
        "stop_words": [text(word) for word in np.asarray(stop).reshape(-1)] if stop is not None else [],
        "presence_penalty": scalar("presence_penalty", 0.0, float),
        "frequency_penalty": scalar("frequency_penalty", 0.0, float),
    }


def outputs(text: str, final: tuple | None = None) -> dict[str, np.ndarray]:
    """One response's tensors (batch of one); the final one carries finish reason and token counts."""
    tensors = {"text_output": np.array([[text.encode()]], dtype=object)}
    if final is not None:
        reason, prompt_tokens, completion_tokens = final
        tensors["finish_reason"] = np.array([[reason.encode()]], dtype=object)
        tensors["num_input_tokens"] = np.array([[prompt_tokens]], dtype=np.uint32)
        tensors["num_output_tokens"] = np.array([[completion_tokens]], dtype=np.uint32)
    return tensors


class TritonPythonModel:
    """The Python backend's entry point (this file is a model repository's ``model.py``)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        device = "cuda" if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available() else "cpu"
        self.generator = Generator(weights, device)

    def _tensors(self, arrays: dict[str, np.ndarray]):
        return [self.pb.Tensor(name, array) for name, array in arrays.items()]

    def execute(self, requests):
        responses = []
        for request in requests:

            def get(name, request=request):
                tensor = self.pb.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                settings = read_request(get)
            except Exception as exc:  # a malformed request fails alone
                error = self.pb.InferenceResponse(error=self.pb.TritonError(f"bad request: {exc}"))
                if self.decoupled:
                    request.get_response_sender().send(error, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    responses.append(error)
                continue
            if self.decoupled:
                sender = request.get_response_sender()
                for piece in self.generator.stream(**settings):
                    if isinstance(piece, tuple):
                        sender.send(
                            self.pb.InferenceResponse(self._tensors(outputs("", piece))),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                        )
                    else:
                        sender.send(self.pb.InferenceResponse(self._tensors(outputs(piece))))
            else:
                pieces = list(self.generator.stream(**settings))
                responses.append(self.pb.InferenceResponse(self._tensors(outputs("".join(pieces[:-1]), pieces[-1]))))
        return None if self.decoupled else responses
