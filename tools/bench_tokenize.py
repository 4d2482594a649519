#!/usr/bin/env python3
"""Encoding speed of qwen3d's tokenizer against Hugging Face `tokenizers`, one thread each, on the
same corpus, and whether their ids agree.  Also checks extra strings (Unicode spaces, NEL, U+180E,
...) and, when transformers is installed, every chat_extra.jsonl rendering against
apply_chat_template itself.

    python3 tools/bench_tokenize.py [--qwen3d build/qwen3d] [--tokenizer tests/fixtures/tokenizer]
                                    [--mb 10] [--corpus FILE | --files 'userspace/*.c' ...]
                                    [--seconds 3]

The corpus (default: the texts of tests/fixtures/tokenizer/encode.jsonl, repeated to --mb
megabytes) is encoded two ways by both: as one text in one call ("whole"), and one call per
document ("docs", what a server does).  Needs python3 + tokenizers (+ transformers for the chat check); runs
offline.  Prints MB/s for each and a verdict line; exit 1 when ids or renderings differ.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_RS_NUM_CPUS"] = "1"

from tokenizers import Tokenizer  # noqa: E402

EXTRA = [
    "x\u180e\u180ey", "a\u0085b \u0085 c", "\u00a0nbsp\u2003em\u3000ideo", "zero\u200bwidth\u200d", "tab\t\u000b\u000cff",
    "line\u2028sep\u2029para", "   \n\n  \r\n\t ", "ſ 'ſ 'S 'ſt", "K \u212a \u2126 \u00c5 \u212b", "e\u0301\u0323 \u1e0b\u0323",
    "\uac00\u11a8 \u1100\u1161\u11a8", "\U0001d15e \U0001d165", "<|im_end|>\u0338 >\u0338", "<|im_start|><|im_start|>x",
    "\U0010ffff \U000e0001", "१२३ ٣٤ ⅷ ½", "'s'S'Ll'LL", "don't\nWON'T", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ﬃ ǅ",
]


def hf_time(fn, seconds):
    """Runs fn until seconds have passed (after one warm-up call); returns (rounds, elapsed)."""
    fn()
    rounds, t0 = 0, time.perf_counter()
    while True:
        fn()
        rounds += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return rounds, dt


def qwen3d_bench(args, path, docs):
    """qwen3d tokenize --bench on path; returns (MB/s, list of id lists, one per document)."""
    out = path + ".ids"
    cmd = [args.qwen3d, "tokenize", "--tokenizer", args.tokenizer, "--bench", path, "--seconds", str(args.seconds),
           "--ids-out", out] + (["--docs"] if docs else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr.strip())
        sys.exit(1)
    print("  " + r.stdout.strip())
    mbs = float(r.stdout.split(":")[-1].split("MB/s")[0])
    return mbs, [[int(x) for x in line.split()] for line in open(out).read().split("\n")[:-1]]


def compare(what, got, want):
    if got == want:
        return True
    for d, (g, w) in enumerate(zip(got, want)):
        if g != w:
            i = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            print(f"  {what}: ids DIFFER in document {d} at token {i}: qwen3d {g[i:i + 8]}, HF {w[i:i + 8]}")
            return False
    print(f"  {what}: {len(got)} documents from qwen3d, {len(want)} from HF")
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen3d", default="build/qwen3d")
    ap.add_argument("--tokenizer", default="tests/fixtures/tokenizer")
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--corpus", help="one UTF-8 text file (whole-text mode only)")
    ap.add_argument("--files", action="append", default=[], help="glob of documents (default: encode.jsonl texts)")
    ap.add_argument("--seconds", type=float, default=3)
    args = ap.parse_args()

    if args.corpus:
        docs, what = [open(args.corpus, encoding="utf-8").read()], args.corpus
    elif args.files:
        names = sorted({f for g in args.files for f in glob.glob(g, recursive=True) if os.path.isfile(f)})
        docs = []
        for f in names:
            try:
                docs.append(open(f, encoding="utf-8").read())
            except (UnicodeDecodeError, OSError):
                pass
        what = f"{len(docs)} files"
    else:
        docs = [json.loads(line)["text"] for line in open(os.path.join(args.tokenizer, "encode.jsonl"), encoding="utf-8")]
        what = "the encode.jsonl texts"
    docs = [d for d in docs if "\0" not in d]
    size = sum(len(d.encode()) for d in docs)
    reps = max(1, int(args.mb * 1e6 / max(1, size)))
    docs = docs * reps
    whole = "".join(docs)
    data = whole.encode()
    print(f"corpus: {what} x {reps}: {len(docs)} documents, {len(data) / 1e6:.2f} MB; one thread each")

    tmp = tempfile.mkdtemp()
    hf = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    results, ok = [], True
    for mode in ("whole", "docs"):
        path = os.path.join(tmp, mode)
        with open(path, "wb") as f:
            f.write(data if mode == "whole" else "\0".join(docs).encode())
        print(f"{mode}: " + ("the corpus as one text, one encode call" if mode == "whole" else
                             "one encode call per document"))
        if mode == "whole":
            want = [hf.encode(whole, add_special_tokens=False).ids]
            rounds, dt = hf_time(lambda: hf.encode(whole, add_special_tokens=False), args.seconds)
        else:
            want = [hf.encode(d, add_special_tokens=False).ids for d in docs]
            rounds, dt = hf_time(lambda: [hf.encode(d, add_special_tokens=False) for d in docs], args.seconds)
        hf_mbs = len(data) * rounds / dt / 1e6
        print(f"  HF tokenizers: {sum(map(len, want))} tokens, {rounds} rounds in {dt:.2f} s: {hf_mbs:.2f} MB/s")
        q_mbs, got = qwen3d_bench(args, path, mode == "docs")
        agree = compare(mode, got, want)
        ok = ok and agree
        results.append(f"{mode}: qwen3d {q_mbs:.2f} MB/s vs HF {hf_mbs:.2f} MB/s ({q_mbs / hf_mbs:.2f}x), "
                       f"ids {'agree' if agree else 'DIFFER'}")

    bad = 0
    for s in EXTRA:
        want = hf.encode(s, add_special_tokens=False).ids
        got = subprocess.run([args.qwen3d, "tokenize", "--tokenizer", args.tokenizer], input=s.encode(),
                             capture_output=True).stdout.split()
        if [int(x) for x in got] != want:
            bad += 1
            print(f"extra string {s!r}: qwen3d {got}, HF {want}")
    print(f"extra strings: {len(EXTRA) - bad}/{len(EXTRA)} agree")
    chat_bad = check_chat(args)
    print("verdict: " + "; ".join(results) + f"; extra strings {'agree' if not bad else 'DIFFER'}" +
          ("" if chat_bad is None else "; chat renderings " + ("agree" if not chat_bad else "DIFFER")))
    sys.exit(0 if ok and not bad and not chat_bad else 1)


def check_chat(args):
    """chat.jsonl and chat_extra.jsonl requests through transformers' apply_chat_template."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        print("chat check skipped: no transformers")
        return None
    template = open(os.path.join(args.tokenizer, "chat_template.jinja"), encoding="utf-8").read()
    tk = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.tokenizer, "tokenizer.json"),
                                 chat_template=template, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    bad = n = 0
    for name in ("chat.jsonl", "chat_extra.jsonl"):
        path = os.path.join(args.tokenizer, name)
        if not os.path.exists(path):
            continue
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            req = rec.get("request") or {k: rec[k] for k in ("messages", "tools", "add_generation_prompt")}
            try:
                want = tk.apply_chat_template(req["messages"], tools=req.get("tools"), tokenize=False,
                                              add_generation_prompt=req["add_generation_prompt"])
            except Exception as e:  # the template raising: qwen3d must refuse too
                want = None
                err = e
            r = subprocess.run([args.qwen3d, "render"], input=json.dumps(req, ensure_ascii=False).encode(),
                               capture_output=True)
            n += 1
            if want is None:
                if r.returncode == 0:
                    bad += 1
                    print(f"{name}: transformers raises ({err}), qwen3d renders")
            elif r.returncode or r.stdout.decode() != want:
                bad += 1
                print(f"{name}: rendering differs: {r.stderr.decode().strip()}\n  qwen3d {r.stdout.decode()!r}\n"
                      f"  transformers {want!r}")
    print(f"chat renderings: {n - bad}/{n} agree with transformers")
    return bad


main()
