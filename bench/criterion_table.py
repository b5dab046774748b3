"""Turns criterion's text output into markdown tables (median throughput, MB/s = 10^6 B/s).

Usage: cargo bench -p shardpress-core --bench passes -- --noplot | python3 bench/criterion_table.py
For `passes`: one row per preset with encode on one thread, on all threads, the entropy frame
on one thread, each also as a fraction of the memcpy measured in the same run. Other benches:
one row per benchmark id.
"""

import re
import sys

UNITS = {"B/s": 1e-6, "KiB/s": 1024 / 1e6, "MiB/s": 1024**2 / 1e6, "GiB/s": 1024**3 / 1e6}


def parse(lines):
    rates, current = {}, None
    for line in lines:
        m = re.match(r"^(\S+)\s+time:", line)
        if m:
            current = m.group(1)
        elif re.match(r"^(\S+)\s*$", line):
            current = line.strip()
        m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and current:
            rates[current] = float(m.group(1)) * UNITS[m.group(2)]
    return rates


def main():
    rates = parse(sys.stdin.read().splitlines())
    memcpy = next((v for k, v in rates.items() if k.startswith("passes/memcpy")), None)
    presets = sorted({k.split("/")[1] for k in rates if k.startswith("passes/") and "memcpy" not in k},
                     key=lambda p: min(i for i, k in enumerate(rates) if k.startswith(f"passes/{p}/")))
    if presets:
        print(f"memcpy of the same BF16 matrix, same run: {memcpy:,.0f} MB/s" if memcpy else "memcpy: not measured")
        print()
        print("| preset | encode, 1 thread MB/s | / memcpy | encode, all threads MB/s | / memcpy | entropy frame, 1 thread MB/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in presets:
            get = lambda b: rates.get(f"passes/{p}/{b}")
            one, all_, frame = get("encode_1t"), get("encode_all"), get("frame_1t")
            frac = lambda v: f"{v / memcpy:.3f}" if v and memcpy else ""
            fmt = lambda v: f"{v:,.0f}" if v else ""
            print(f"| {p} | {fmt(one)} | {frac(one)} | {fmt(all_)} | {frac(all_)} | {fmt(frame)} |")
    others = [k for k in rates if not k.startswith("passes/")]
    if others:
        print()
        print("| benchmark | MB/s (median) |")
        print("|---|---:|")
        for k in others:
            print(f"| {k} | {rates[k]:,.0f} |")


if __name__ == "__main__":
    main()
