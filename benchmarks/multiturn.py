"""A conversation's follow-up turns: the ONNX pyfunc with its prefix cache, without it, and
llama.cpp Q4_0 with its own prefix reuse (with --llama-cpp), each in a fresh process, timed turn
by turn in alternation.

The conversation: a history of HISTORY_TOKENS tokens (alternating user and assistant messages),
then TURNS turns, each adding a user message of about USER_TOKENS tokens and asking for
`plan.new_tokens` tokens. Every runtime is sent the same messages: the assistant messages of the
history and of earlier turns are fixed text of about ANSWER_TOKENS tokens, not the runtime's own
(random-weight) answer, so a follow-up's new tokens are the previous answer's text, the new user
message and the template's tags; a real client sending back the model's own answer shares that
answer's tokens too, when they tokenize the same, so this is the pessimistic case.

Per turn: TTFT with the cache, without it, and for llama.cpp; and the TTFT of a prompt made of
the turn's new tokens alone (same count, shared with nothing), in the cached process right after
the turn. Also: single requests at 16 and 256 tokens that share nothing (the cache's cost when it
cannot help), the memory each process holds, and eviction: distinct long prompts after the
conversation push the cache past its budget (PREFIX_BUDGET_MB here, so that it happens within a
few requests), and the cache must stay within it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.measure import ROOT, WORDS, Plan, _is_json, _read_line, _spec, chat_prompts
from benchmarks.probe import ASK, MEMORY, progress

HISTORY_TOKENS = 1500
TURNS = 5
USER_TOKENS = 50
ANSWER_TOKENS = 32
SINGLE_LENGTHS = (16, 256)  # prompts that share nothing, with the cache and without
SINGLE_RUNS = 3
EVICTING_PROMPTS = 4  # distinct 256-token prompts after the conversation
PREFIX_BUDGET_MB = 2560  # the conversation's generator (~1.8 GB at full size) and a little more
CACHE_ENV = "PHI3FLOW_ONNX_PREFIX_CACHE_MB"


def _text(tokenizer, tokens: int, offset: int) -> str:
    """Words from WORDS (starting at `offset`) that tokenize to about `tokens` tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.append(WORDS[(offset + len(words)) % len(WORDS)])
    return " ".join(words)


def conversation(checkpoint: Path, history_tokens: int = HISTORY_TOKENS, turns: int = TURNS,
                 user_tokens: int = USER_TOKENS) -> dict:
    """Each turn's request (the whole conversation so far), its length in tokens and how many of
    them are new since the previous turn's prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def ids(messages: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]

    history: list[dict] = []
    while len(ids(history + [{"role": "user", "content": "x"}])) < history_tokens:
        n = len(history)
        history += [{"role": "user", "content": f"Question {n}: " + _text(tokenizer, user_tokens, n)},
                    {"role": "assistant", "content": f"Answer {n}: " + _text(
                        tokenizer, ANSWER_TOKENS, n + 7)}]
    requests, lengths, new = [], [], []
    messages, previous = list(history), None
    for turn in range(turns):
        messages = messages + [{"role": "user", "content": f"Turn {turn + 1}: " + _text(
            tokenizer, user_tokens, 3 * turn + 1)}]
        current = ids(messages)
        shared = 0
        if previous is not None:
            while (shared < min(len(previous), len(current))
                   and previous[shared] == current[shared]):
                shared += 1
        requests.append(messages)
        lengths.append(len(current))
        new.append(len(current) - shared)
        previous = current
        messages = messages + [{"role": "assistant", "content": f"Reply {turn + 1}: " + _text(
            tokenizer, ANSWER_TOKENS, 5 * turn + 2)}]
    return {"requests": requests, "prompt_tokens": lengths, "new_tokens": new}


def measure(onnx_model: Path, checkpoint: Path, gguf: Path | None, plan: Plan,
            small: bool = False) -> dict:
    """The scenario (see the module docstring); `small` shrinks it for the smoke run."""
    talk = conversation(checkpoint, *((400, 3, 20) if small else ()))
    # Every prompt below starts at its own word of WORDS (a variant), so none shares a prefix.
    variants = iter(range(1, len(WORDS)))
    singles = {str(n): [chat_prompts(checkpoint, (n,), variant=next(variants))[str(n)]
                        for _ in range(SINGLE_RUNS)] for n in SINGLE_LENGTHS}
    # A prompt of each follow-up's new tokens alone (the first turn's are all of its prompt).
    alone = {k: chat_prompts(checkpoint, (talk["new_tokens"][k],), variant=next(variants))[
        str(talk["new_tokens"][k])] for k in range(1, len(talk["requests"]))}
    evicting = [chat_prompts(checkpoint, (256,), variant=next(variants))["256"]
                for i in range(EVICTING_PROMPTS)]
    runtimes = {"cache": ("ONNX pyfunc, prefix cache", "pyfunc", onnx_model, PREFIX_BUDGET_MB),
                "no_cache": ("ONNX pyfunc, no prefix cache", "pyfunc", onnx_model, 0)}
    if gguf is not None:
        runtimes["llama_cpp"] = ("llama.cpp Q4_0 (its own prefix reuse)", "llama_cpp", gguf, None)
    longest = max(talk["prompt_tokens"]) + plan.new_tokens
    warmup = chat_prompts(checkpoint, (16,), variant=next(variants))
    procs = {}
    with tempfile.TemporaryDirectory(prefix="phi3flow-bench-turns-") as tmp:
        for key, (name, runtime, model, budget) in runtimes.items():
            progress(f"multi-turn, {name}: loading {model}")
            spec, _ = _spec(Path(tmp) / key, name, runtime, model, warmup, plan, 1, stream=True,
                            paired=True, tokenizer=checkpoint)
            data = json.loads(spec.read_text())
            # llama.cpp: room for the longest turn, and the slot's KV cache kept between calls
            data |= {"n_ctx": longest, "keep_prefix": True}
            spec.write_text(json.dumps(data))
            env = dict(os.environ)
            if budget is not None:
                env[CACHE_ENV] = str(budget)
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.probe", str(spec), str(Path(tmp) / key / "o")],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            _read_line(procs[key], lambda line: line == "ready")

        def ask(key: str, messages: list[dict], what: str) -> dict:
            progress(f"multi-turn, {runtimes[key][0]}: {what}")
            procs[key].stdin.write(f"{ASK} " + json.dumps(
                {"messages": messages, "new_tokens": plan.new_tokens}) + "\n")
            procs[key].stdin.flush()
            return json.loads(_read_line(procs[key], _is_json))

        def memory(key: str) -> dict:
            procs[key].stdin.write(MEMORY + "\n")
            procs[key].stdin.flush()
            return json.loads(_read_line(procs[key], _is_json))

        result: dict = {"history_tokens": HISTORY_TOKENS if not small else 400,
                        "new_tokens_per_answer": plan.new_tokens, "runtimes": {
                            k: v[0] for k, v in runtimes.items()},
                        "budget_mb": PREFIX_BUDGET_MB, "loaded": {k: memory(k) for k in procs}}
        onnx = ("cache", "no_cache")
        result["singles"] = {}
        for n, prompts in singles.items():  # alternating, run by run
            runs: dict[str, list[dict]] = {k: [] for k in onnx}
            for i, messages in enumerate(prompts):
                for key in onnx:
                    runs[key].append(ask(key, messages, f"a {n}-token prompt sharing nothing, "
                                         f"run {i + 1}/{len(prompts)}"))
            result["singles"][n] = runs
        turns = []
        for k, messages in enumerate(talk["requests"]):
            row = {"turn": k + 1, "prompt_tokens": talk["prompt_tokens"][k],
                   "new_tokens": talk["new_tokens"][k] if k else talk["prompt_tokens"][k]}
            for key in procs:
                row[key] = ask(key, messages, f"turn {k + 1} ({row['prompt_tokens']} tokens)")
            if k in alone:
                row["alone"] = ask("cache", alone[k], f"turn {k + 1}'s {row['new_tokens']} new "
                                   "tokens alone")
            turns.append(row)
        result["turns"] = turns
        result["after_turns"] = {k: memory(k) for k in procs}
        result["evicting"] = [ask("cache", p, f"a distinct 256-token prompt {i + 1}/"
                                  f"{len(evicting)} (evicting)") for i, p in enumerate(evicting)]
        result["after_eviction"] = {k: memory(k) for k in onnx}
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=600)
    return summarize(result)


def summarize(result: dict) -> dict:
    """The ratios the targets are about."""
    follow = [row for row in result["turns"] if "alone" in row]
    result["follow_up_vs_alone"] = [row["cache"]["ttft_s"] / row["alone"]["ttft_s"]
                                    for row in follow]
    result["cache_vs_no_cache_ttft"] = [row["cache"]["ttft_s"] / row["no_cache"]["ttft_s"]
                                        for row in follow]
    if follow and "llama_cpp" in follow[0]:
        result["follow_up_vs_llama_cpp"] = [row["cache"]["ttft_s"] / row["llama_cpp"]["ttft_s"]
                                            for row in follow]
    # Nothing shared: the single requests and the first turn, with the cache and without.
    first = result["turns"][0]
    result["nothing_shared"] = {}
    for n in result["singles"]:
        pairs = list(zip(result["singles"][n]["cache"], result["singles"][n]["no_cache"]))
        result["nothing_shared"][n] = {
            field: statistics.median(a[field] / b[field] for a, b in pairs)
            for field in ("ttft_s", "decode_tokens_per_s")}
    result["nothing_shared"][str(first["prompt_tokens"])] = {
        field: first["cache"][field] / first["no_cache"][field]
        for field in ("ttft_s", "decode_tokens_per_s")}
    for row in follow:
        progress(f"multi-turn turn {row['turn']}: TTFT {row['cache']['ttft_s']:.2f} s with the "
                 f"cache ({row['cache'].get('cached_tokens')} tokens cached), "
                 f"{row['no_cache']['ttft_s']:.2f} s without, {row['alone']['ttft_s']:.2f} s for "
                 f"its {row['new_tokens']} new tokens alone" + (
                     f", llama.cpp {row['llama_cpp']['ttft_s']:.2f} s" if "llama_cpp" in row
                     else ""))
    return result
