"""Function calling on engines that generate text (the embedded engine).

The tools reach the model through its chat template's own tool support when it has one (the template is
handed ``tools``, and the history's calls and results in transformers' message format). A template without
it (SmolLM2's) gets the fallback prompt instead: a system block listing the functions as JSON schemas and
asking, to call one, for a JSON object ``{"name": …, "arguments": {…}}`` alone (several: a JSON array of
them); past calls are shown as such JSON and their results as user turns.

An answer is taken as calls when it is such JSON (bare, in a code fence, or in ``<tool_call>`` tags as many
tool-trained models write) and every call names a declared function with arguments valid against its schema;
otherwise it stays text. With ``tool_choice`` ``required`` or a named function the output is constrained to
exactly such calls (structured outputs' grammar), so the calls are always well formed; with ``auto`` the model
chooses. Text that may still turn out to be a call is held back until the choice ends; an answer that
plainly starts as prose streams as it comes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from qubrid_lab.engine.base import Delta, Failure, Finish, GenerationRequest
from qubrid_lab.engine.structured import json_grammar

NO_PARAMETERS = {"type": "object", "properties": {}}
CALL_OPENINGS = ("{", "[", "<tool_call>", "```")
FALLBACK_PROMPT = (
    "You can call these functions (each given as a JSON schema of its arguments):\n{functions}\n"
    "To call a function, answer with only a JSON object of the form "
    '{{"name": "<function name>", "arguments": {{<the arguments>}}}}; to call several, answer with a JSON array '
    "of such objects. A function's result will be given to you in the next message. {rule}"
)
RULES = {
    "auto": "If no function is needed, answer normally.",
    "required": "You must call at least one function.",
    "named": "You must call the function {name}.",
}
TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


@dataclasses.dataclass
class ToolPlan:
    """How one chat request with tools is run: the messages and tools for the template, the functions an
    answer may call, and the grammar forcing a call (``required`` or a named function), if any."""

    messages: list[dict]
    template_tools: list[dict] | None
    functions: dict[str, dict]
    grammar: str | None


def _functions(tools: list[dict] | None) -> dict[str, dict]:
    return {tool["function"]["name"]: tool["function"] for tool in tools or []}


def _call_json(call: dict) -> dict:
    arguments = call["function"].get("arguments") or "{}"
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass  # shown as the string it was
    return {"name": call["function"]["name"], "arguments": arguments}


def plan(request: GenerationRequest, native: bool) -> ToolPlan:
    """The messages and tools the template gets for ``request``; ``native``: the template takes tools."""
    choice = request.tool_choice
    offered = _functions(request.tools) if choice != "none" else {}
    names = {call["id"]: call["function"]["name"] for m in request.messages for call in m.get("tool_calls") or []}
    messages = [_native(m, names) if native else _fallback(m, names) for m in request.messages]
    if offered and not native:
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        rule = RULES["named"].format(name=named) if named else RULES.get(choice, RULES["auto"])
        listing = json.dumps(
            [
                {
                    "name": name,
                    "description": f.get("description") or "",
                    "parameters": f.get("parameters") or NO_PARAMETERS,
                }
                for name, f in offered.items()
            ]
        )
        block = FALLBACK_PROMPT.format(functions=listing, rule=rule)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}
        else:
            messages.insert(0, {"role": "system", "content": block})
    template_tools = [{"type": "function", "function": f} for f in offered.values()] if native and offered else None
    return ToolPlan(messages, template_tools, offered, _forcing_grammar(offered, choice, request.parallel_tool_calls))


def _native(message: dict, names: dict[str, str]) -> dict:
    """A message in transformers' chat-template format (a call's arguments as an object)."""
    out = {
        "role": "system" if message["role"] == "developer" else message["role"],
        "content": message.get("content") or "",
    }
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": _call_json(call)} for call in message["tool_calls"]]
    if message["role"] == "tool":
        out["name"] = names.get(message.get("tool_call_id"), "")
        out["tool_call_id"] = message.get("tool_call_id")
    return out


def _fallback(message: dict, names: dict[str, str]) -> dict:
    """A message for a template without tool support: calls as the JSON the fallback prompt asks for,
    results as user turns."""
    role, content = message["role"], message.get("content") or ""
    if role == "tool":
        name = names.get(message.get("tool_call_id"), "a function")
        return {"role": "user", "content": f"The function {name} returned:\n{content}"}
    if message.get("tool_calls"):
        calls = [_call_json(call) for call in message["tool_calls"]]
        shown = json.dumps(calls[0] if len(calls) == 1 else calls)
        return {"role": role, "content": f"{content}\n{shown}" if content else shown}
    return {"role": "system" if role == "developer" else role, "content": content}


def _forcing_grammar(offered: dict[str, dict], choice, parallel: bool) -> str | None:
    """The grammar of the answers ``required`` or a named function allows: calls, nothing else."""
    if not offered or choice in ("auto", "none"):
        return None
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    calls = [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": _closed(f.get("parameters") or NO_PARAMETERS)},
        }
        for name, f in offered.items()
        if named in (None, name)
    ]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # several calls are an array; one call may stay a bare object, which ends the answer when it closes (an
    # array left to the model tends to repeat its call until max_tokens)
    several = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
    return json_grammar(several if parallel and not named else one, strict=False)


def _closed(parameters: dict) -> dict:
    """The arguments a call may hold: the declared ones only, unless the schema says otherwise (left open, a
    small model fills a forced call with invented keys until it runs out of tokens)."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def parse_calls(text: str, functions: dict[str, dict]) -> list[dict] | None:
    """The tool calls ``text`` makes, in OpenAI's shape with fresh ids; None when it is not (only) calls."""
    import jsonschema

    stripped = text.strip()
    fenced = FENCED.match(stripped)
    pieces = TAGGED.findall(stripped) or [fenced.group(1) if fenced else stripped]
    calls = []
    for piece in pieces:
        try:
            value = json.loads(piece)
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in functions:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            try:
                jsonschema.validate(arguments, _closed(functions[item["name"]].get("parameters") or NO_PARAMETERS))
            except (jsonschema.ValidationError, jsonschema.SchemaError):
                return None
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": item["name"], "arguments": json.dumps(arguments)},
                }
            )
    return calls or None


def _may_be_call(text: str) -> bool:
    lead = text.lstrip()
    return not lead or any(lead.startswith(o) or o.startswith(lead) for o in CALL_OPENINGS)


class ToolCallRun:
    """A run whose answers may be tool calls; everything else is the wrapped run's."""

    def __init__(self, run, functions: dict[str, dict]):
        self.run, self.functions = run, functions
        self._held = [""] * run.choices
        self._held_logprobs: list[list] = [[] for _ in range(run.choices)]
        self._streaming = [False] * run.choices

    def __getattr__(self, name: str):
        return getattr(self.run, name)

    async def events(self):
        async for event in self.run.events():
            if isinstance(event, Failure) or self._streaming[event.index]:
                yield event
                continue
            i = event.index
            self._held[i] += event.text
            self._held_logprobs[i] += event.logprobs or []
            logprobs = self._held_logprobs[i] if event.logprobs is not None else None
            if isinstance(event, Delta):
                if not _may_be_call(self._held[i]):  # prose: send what was held, then stream the rest
                    self._streaming[i] = True
                    yield Delta(i, self._held[i], logprobs)
                continue
            calls = parse_calls(self._held[i], self.functions) if event.reason == "stop" else None
            if calls:
                yield Finish(i, "tool_calls", "", event.completion_tokens, logprobs, tool_calls=calls)
            else:
                yield Finish(i, event.reason, self._held[i], event.completion_tokens, logprobs)
