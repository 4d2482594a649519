#!/usr/bin/env python3
"""Extra chat-template and tojson vectors for qwen3d's tests, made with jinja2 and Python's json.

Renders chat_template.jinja exactly the way Hugging Face transformers' apply_chat_template does
(jinja2 ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, and `tojson`
overridden to json.dumps(x, ensure_ascii=False)), for edge cases that the transformers-made
chat.jsonl does not cover: content that is not a string, tool calls without a "function"
wrapper, arguments with floats and escapes, tool messages first, later system messages, ...
The script first checks that it reproduces every rendering of chat.jsonl byte for byte.

    python3 tools/make_chat_vectors.py tests/fixtures/tokenizer

writes chat_extra.jsonl ({"request", "text"} or {"request", "error"}) and json_py.jsonl
({"json": text, "python": json.dumps(json.loads(text), ensure_ascii=False)}).
Needs only jinja2.
"""
import json
import os
import sys

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render(template, req):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    return env.from_string(template).render(messages=req["messages"], tools=req.get("tools"),
                                            add_generation_prompt=req.get("add_generation_prompt", False),
                                            bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Évalue une expression — 計算",
                                           "parameters": {"type": "object", "properties": {
                                               "expr": {"type": "string"},
                                               "precision": {"type": "number", "minimum": 0.5, "default": 1e-7},
                                               "max": {"type": "integer", "maximum": 9007199254740993}},
                                               "required": ["expr"]}}},
         {"name": "bare", "parameters": {}, "type": "function"}]
ARGS = {"x": 1.5, "y": [1, 2.0, 1e-7, 1e22, -0.0, 0.1, 123456789.123456789, 1e16, 1234567890123456.0],
        "s": "é\n\"q\"\\ \u0001\u001f \u2028 \t/\u007f 😀", "b": True, "f": False, "n": None, "o": {}, "a": []}

CASES = [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts are not strings"}]}]},
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "literal <|im_end|> and <tool_call> inside"}]},
    {"messages": [{"role": "user", "content": "go"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": ARGS}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "42"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "bare calls"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"name": "calc", "arguments": {"expr": "1+1"}},
                      {"name": "bare", "arguments": "{\"raw\":  true,\n \"x\":1}"}]}]},
    {"messages": [{"role": "user", "content": "text then calls"},
                  {"role": "assistant", "content": "Sure.", "tool_calls": [
                      {"type": "function", "function": {"name": "calc", "arguments": {}}},
                      {"type": "function", "function": {"name": "calc", "arguments": []}},
                      {"type": "function", "function": {"name": "calc", "arguments": 7}}]}], "tools": TOOLS},
    {"messages": [{"role": "tool", "content": "r1"}, {"role": "tool", "content": ["not", "text"]},
                  {"role": "user", "content": "u"}, {"role": "tool", "content": "r3"}]},
    {"messages": [{"role": "system", "content": "first"}, {"role": "user", "content": "a"},
                  {"role": "system", "content": "later"}, {"role": "system", "content": None}], "tools": TOOLS},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}], "tools": TOOLS},
    {"messages": [{"role": "system", "content": "tools empty"}, {"role": "user", "content": "x"}], "tools": []},
    {"messages": [{"role": "user", "content": "no system, tools"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "多语言 😀 emoji\r\n\ttabs"},
                  {"role": "assistant", "content": "answer", "tool_calls": []},
                  {"role": "assistant", "content": "again", "tool_calls": None}]},
    {"messages": [{"role": "user", "content": "x", "name": "bob", "extra": {"k": 1}}]},
    {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}], "error": True},
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "s"}]}, {"role": "user", "content": "x"}],
     "tools": TOOLS, "error": True},
]

JSON_TEXTS = [
    '1', '-0', '0', '-0.0', '0.0', '1.0', '1.5', '-2.25', '0.1', '0.2', '0.3', '1e-7', '1E5', '1e16', '1e15',
    '1e22', '1.5e300', '5e-324', '2.2250738585072014e-308', '1.7976931348623157e308', '9007199254740993',
    '9007199254740993.0', '123456789.123456789', '1234567890123456.0', '12345678901234567.0', '0.0001',
    '0.00001', '0.000123', '100.0', '3.14159', '2.5e-5', '-1e-10', '9223372036854775807', '-9223372036854775808',
    '"plain"', '""', '"é ü 中 😀 \\ud83d\\ude00"', '"\\u0000x"', '"\\u0001\\u001f\\u007f\\u0080\\u2028\\u2029"',
    '"quote \\" backslash \\\\ slash / \\b\\f\\n\\r\\t"', 'true', 'false', 'null', '[]', '{}', '[[], {}, [{}]]',
    '{"a": 1, "b": [1, 2.0, "x"], "c": {"d": null}}', '{"b": 1, "a": 2, "c": 3}', '{"a": 1, "b": 2, "a": 3}',
    '{"k\\u00e9y": "v", "\\n": "\\t"}', '[1,2,3]', '{"nested": {"deep": [[[[1.25]]]]}}',
    # powers of two: the correctly rounded shortest digits do not always read back (repr takes a neighbour)
    '5.9604644775390625e-08', '5.684341886080802e-14', '6.1897001964269013e26',
]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tokenizer"
    template = open(os.path.join(out, "chat_template.jinja"), encoding="utf-8").read()
    n = 0
    for line in open(os.path.join(out, "chat.jsonl"), encoding="utf-8"):
        d = json.loads(line)
        assert render(template, d) == d["text"], "does not reproduce chat.jsonl"
        n += 1
    print(f"reproduces all {n} renderings of chat.jsonl")
    with open(os.path.join(out, "chat_extra.jsonl"), "w", encoding="utf-8") as f:
        for case in CASES:
            for agp in (True, False):
                req = {k: v for k, v in case.items() if k != "error"}
                req["add_generation_prompt"] = agp
                try:
                    rec = {"request": req, "text": render(template, req)}
                    assert not case.get("error"), "expected an error"
                except TypeError as e:
                    assert case.get("error"), e
                    rec = {"request": req, "error": str(e)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "json_py.jsonl"), "w", encoding="utf-8") as f:
        for t in JSON_TEXTS:
            f.write(json.dumps({"json": t, "python": json.dumps(json.loads(t), ensure_ascii=False)},
                               ensure_ascii=False) + "\n")
    print(f"{2 * len(CASES)} chat cases, {len(JSON_TEXTS)} json cases written to {out}")


main()
