#!/usr/bin/env python3
"""Reads bench-gpu's --timeline-json offline: where one profiled step's time goes, in order.

bench-gpu --profile-steps N --timeline-json PATH writes every device event of the plain and DySCO
profiles (N steps each) in start order as [name, start_us, duration_us]. This prints, for one step
of one profile:
  - the events in order with runs of the same kernel collapsed (start, span, idle before the run),
    so a step's phases (the speculative pass, the DySCO stage, the real pass) can be read off;
  - what each kernel name adds to the step's end (its end minus the latest end before it), i.e.
    its share of the critical path;
  - with --window FROM TO (regular expressions): the stretch from the first event matching FROM to
    the end of the last matching TO, its span, busy time and kernels; e.g. the DySCO stage between
    the passes: --window Relevance 'SelectWrite|SelectFused|SelectBias'.
Steps are told apart by the N - 1 longest idle stretches (the host's time between steps).
docs/performance.md "Where the time goes" says how it is used.

With --summary, one line each instead (what gpu-ab.sh puts in its ab.md): the step's span and busy
time and its top kernels by critical-path share, and the window's span, busy time and kernels.

usage: timeline.py TIMELINE.json [--mode plain|dysco] [--step K] [--window FROM TO] [--max-rows N]
                   [--summary]
"""
import argparse
import json
import re
import sys


def split_steps(events, steps):
    """The events of each step: cut at the steps - 1 longest idle stretches."""
    if steps <= 1 or len(events) < 2:
        return [events]
    ends = []
    end = events[0][1] + events[0][2]
    for i in range(1, len(events)):
        ends.append((events[i][1] - end, i))
        end = max(end, events[i][1] + events[i][2])
    cuts = sorted(i for _, i in sorted(ends, reverse=True)[: steps - 1])
    out, lo = [], 0
    for c in cuts:
        out.append(events[lo:c])
        lo = c
    out.append(events[lo:])
    return out


def busy_us(events):
    """The union of the events' intervals."""
    total, begin, end = 0.0, None, None
    for _, start, dur in sorted(events, key=lambda e: e[1]):
        if begin is None or start > end:
            if begin is not None:
                total += end - begin
            begin, end = start, start + dur
        else:
            end = max(end, start + dur)
    if begin is not None:
        total += end - begin
    return total


def runs(events):
    """Consecutive events of one name collapsed: (name, count, start, end, idle before)."""
    out = []
    prev_end = events[0][1] if events else 0.0
    for name, start, dur in events:
        if out and out[-1][0] == name:
            n, c, s, e, idle = out[-1]
            out[-1] = (n, c + 1, s, max(e, start + dur), idle + max(0.0, start - prev_end))
        else:
            out.append((name, 1, start, start + dur, max(0.0, start - prev_end)))
        prev_end = max(prev_end, start + dur)
    return out


def increments(events):
    """Per name: (calls, the time each call adds to the step's end): its end minus the latest end
    before it (0 when it ends earlier). On one stream that is the kernel's share of the critical
    path, its early start's overlap with the kernel ahead not counted, and the idle before it
    included."""
    out, end = {}, None
    for name, start, dur in events:
        e = start + dur
        add = 0.0 if end is None else max(0.0, e - end)
        if end is None:
            add = dur
        c, t = out.get(name, (0, 0.0))
        out[name] = (c + 1, t + add)
        end = e if end is None else max(end, e)
    return out


def short_name(name):
    """A kernel's name without its namespace, arguments and template arguments."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    name = name.split("<")[0].split("(")[0].strip()
    return name.split("::")[-1] or "?"


def durations_by_name(events):
    """Per name: (calls, their summed durations)."""
    out = {}
    for name, _, dur in events:
        c, t = out.get(name, (0, 0.0))
        out[name] = (c + 1, t + dur)
    return out


def window(events, start_re, end_re):
    """The events from the first matching start_re through the last matching end_re."""
    first = next((i for i, e in enumerate(events) if re.search(start_re, e[0])), None)
    last = next((i for i in range(len(events) - 1, -1, -1) if re.search(end_re, events[i][0])),
                None)
    if first is None or last is None or last < first:
        return None
    return events[first:last + 1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("timeline")
    ap.add_argument("--mode", default="dysco", choices=["plain", "dysco"])
    ap.add_argument("--step", type=int, default=-1, help="which step (default: the middle one)")
    ap.add_argument("--window", nargs=2, metavar=("FROM", "TO"))
    ap.add_argument("--max-rows", type=int, default=400)
    ap.add_argument("--summary", action="store_true", help="one line for the step, one for the window")
    args = ap.parse_args(argv)
    doc = json.load(open(args.timeline))
    events = doc[args.mode]
    if not events:
        print(f"no {args.mode} events in {args.timeline}")
        return 1
    steps = split_steps(events, int(doc.get("steps", 1)))
    k = args.step if args.step >= 0 else len(steps) // 2
    step = steps[k]
    t0 = step[0][1]
    span = max(s + d for _, s, d in step) - t0
    critical = sorted(increments(step).items(), key=lambda x: -x[1][1])
    w = None
    if args.window:
        w = window(step, *args.window)
        if w is None:
            print(f"window {args.window}: not found in this step")
            return 1
        w_span = max(s + d for _, s, d in w) - w[0][1]
        w_kernels = sorted(durations_by_name(w).items(), key=lambda x: -x[1][1])
    if args.summary:
        parts = [f"{short_name(n)} x{c} {t / c:.1f} us" for n, (c, t) in critical[:8]]
        print(f"{args.mode} step {k} at {doc.get('context')}: span {span:.1f} us, busy "
              f"{busy_us(step):.1f} us; critical path a call: " + "; ".join(parts))
        if w is not None:
            kernels = "; ".join(f"{short_name(n)} x{c} {t:.1f} us" for n, (c, t) in w_kernels[:6])
            print(f"{args.mode} window {args.window[0]}..{args.window[1]}: span {w_span:.1f} us, "
                  f"busy {busy_us(w):.1f} us; {kernels}")
        return 0
    print(f"{args.mode} step {k} of {len(steps)} at {doc.get('context')}: {len(step)} events, "
          f"span {span:.1f} us, busy {busy_us(step):.1f} us")
    print("| start us | span us | idle before us | calls | name |\n|---|---|---|---|---|")
    for i, (name, count, start, end, idle) in enumerate(runs(step)):
        if i >= args.max_rows:
            print("| ... |")
            break
        print(f"| {start - t0:.1f} | {end - start:.1f} | {idle:.1f} | {count} | {name[:80]} |")
    print("\nwhat each kernel adds to the step's end (us; calls): its critical-path share")
    for name, (c, t) in critical[:40]:
        print(f"  {t:8.1f} us  x{c:<4d} {t / c:7.2f} a call  {name[:80]}")
    if w is not None:
        print(f"\nwindow {args.window[0]!r} .. {args.window[1]!r}: {len(w)} events from "
              f"{w[0][1] - t0:.1f} us, span {w_span:.1f} us, busy {busy_us(w):.1f} us")
        for name, (c, t) in w_kernels:
            print(f"  {t:8.1f} us  x{c:<3d} {name[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
