#!/usr/bin/env python3
"""compare_logits.py OUT.safetensors REFERENCE.safetensors [--tol 1e-4]

Checks `qwen3d logits` output against a fixture's reference.safetensors (python3 only, no numpy):
for prefill_logits and (if the reference has them and OUT has them) decode_logits, the shapes
match, no value is NaN or Inf, the relative L2 error is <= tol and the argmax agrees at every
position.  Prints one line per tensor; exits 1 on any failure."""
import json, math, struct, sys


def load(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    data = b[8 + n:]
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        fmt = {"F32": "f", "I32": "i"}[v["dtype"]]
        out[k] = (v["shape"], struct.unpack("<%d%s" % ((e - s) // 4, fmt), data[s:e]))
    return out


def check(name, got, ref, tol):
    gs, g = got
    rs, r = ref
    if gs != rs:
        print("FAIL %s: shape %s, reference %s" % (name, gs, rs))
        return False
    if any(math.isnan(x) or math.isinf(x) for x in g):
        print("FAIL %s: NaN or Inf in the output" % name)
        return False
    num = sum((a - b) ** 2 for a, b in zip(g, r))
    den = sum(b * b for b in r)
    rel = math.sqrt(num / den)
    rows, V = rs
    bad = [i for i in range(rows)
           if max(range(V), key=lambda j: g[i * V + j]) != max(range(V), key=lambda j: r[i * V + j])]
    ok = rel <= tol and not bad
    print("%s %s: rel L2 %.3e (tol %.0e), argmax differs at %d of %d positions%s"
          % ("ok  " if ok else "FAIL", name, rel, tol, len(bad), rows, " %s" % bad[:8] if bad else ""))
    return ok


def main():
    args = sys.argv[1:]
    tol = 1e-4
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    got, ref = load(args[0]), load(args[1])
    ok = check("prefill_logits", got.get("prefill_logits", ([], [])), ref["prefill_logits"], tol)
    if "decode_logits" in got:
        ok &= check("decode_logits", got["decode_logits"], ref["decode_logits"], tol)
    sys.exit(0 if ok else 1)


main()
