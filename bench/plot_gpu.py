#!/usr/bin/env python3
"""Tables and the latency plot of the GPU benchmark (issue 9) from its JSON files.

Reads any mix of: bench-gpu --json files ("bench": "bench-gpu"), bench/hf_peer.py --json files
("peer": "transformers") and `dysco-client bench --json --compare-single` output (the 16-session
server run), each recognised by its keys, and writes
  --table PATH   the combined markdown table (ms per token and ratios to the floors and to the
                 peer, TTFT, the server sessions' throughput, the targets of issue 9); no
                 matplotlib needed;
  --png PATH     per-token latency against context length (log x): plain, DySCO, their floors and
                 the peer, one panel per model shape (needs matplotlib, in a venv of its own:
                 docs/performance.md).
Usage: python3 bench/plot_gpu.py [--table OUT.md] [--png OUT.png] FILE.json...
"""

import argparse
import json
import os
import sys

# Targets of issue 9 (H200, Qwen3-8B shape, bf16, batch 1).
PLAIN_TARGET = 1.15
DYSCO_TARGET = 1.15
DYSCO_OVER_PLAIN_128K = 1.75
SESSIONS_TARGET = 10.0
TTFT_TARGET = 1.3


def load(paths):
    """Sorts the files into (bench-gpu results, peer results, server results); others skipped."""
    benches, peers, servers = [], [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"plot_gpu: skipping {path}: {e}", file=sys.stderr)
            continue
        data["_file"] = os.path.basename(path)
        if data.get("bench") == "bench-gpu":
            benches.append(data)
        elif data.get("peer") == "transformers":
            peers.append(data)
        elif "phases" in data and "config" in data:
            servers.append(data)
    return benches, peers, servers


def peer_for(bench, peers):
    for p in peers:
        if p.get("model_name") == bench.get("model_name"):
            return p
    return None


def peer_row(peer, context):
    if not peer:
        return None
    for r in peer.get("contexts", []):
        if r.get("context") == context and r.get("per_token_ms_p50") is not None:
            return r
    return None


def fmt(x, unit="", digits=2):
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def decode_table(bench, peer):
    name = bench.get("label") or bench.get("model_name")
    lines = [f"### {name} ({bench.get('model_name')}, {bench.get('dtype')}, batch 1, "
             f"{bench.get('device')})", "",
             f"Floors of this run: copy bandwidth {bench['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
             f"at::mm {bench['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s; ms per token are p50 of "
             f"{bench.get('timed_steps')} steps"
             + (f"; peer: transformers {peer.get('transformers')}" if peer else "") + ".", "",
             "| context | plain ms | plain floor | ratio | DySCO ms | DySCO floor | ratio | "
             "DySCO/plain | peer ms | plain/peer | DySCO/peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["contexts"]:
        p = peer_row(peer, r["context"])
        peer_ms = p["per_token_ms_p50"] if p else None
        peer_note = "" if not p or p.get("compiled") else " (no compile)"
        lines.append(
            f"| {r['context']} | {fmt(r['plain_ms_p50'])} | {fmt(r['plain_floor_ms'])} | "
            f"{fmt(r.get('plain_ratio'), 'x')} | {fmt(r.get('dysco_ms_p50'))} | "
            f"{fmt(r.get('dysco_floor_ms'))} | {fmt(r.get('dysco_ratio'), 'x')} | "
            f"{fmt(r.get('dysco_over_plain'), 'x')} | {fmt(peer_ms)}{peer_note} | "
            f"{fmt(ratio(r['plain_ms_p50'], peer_ms), 'x')} | "
            f"{fmt(ratio(r.get('dysco_ms_p50'), peer_ms), 'x')} |")
    if bench.get("dysco"):
        lines += ["", "DySCO step breakdown (mean ms): "
                  + "; ".join(f"{r['context']}: speculative {r['dysco_speculative_ms']:.2f}, "
                              f"relevance + selection {r['dysco_select_ms']:.2f}, real "
                              f"{r['dysco_real_ms']:.2f}, {r['num_selected']} keys selected"
                              for r in bench["contexts"])]
    prof = bench.get("profile")
    if prof:
        kind = "device" if prof.get("device_events") else "CPU-op (nested)"
        for mode in ("plain", "dysco"):
            m = prof.get(mode)
            if not m:
                continue
            if "error" in m:
                lines += ["", f"Profile ({mode}): unavailable: {m['error']}"]
                continue
            top = "; ".join(f"{k['name'][:60]} {k['ms_per_step']:.3f} ms x{k['calls_per_step']:.0f}"
                            for k in m["top"][:6])
            lines += ["", f"Where the time goes, {mode} step at {prof['context']} "
                      f"({prof['steps']} profiled steps): {m['wall_ms_per_step']:.2f} ms wall, "
                      f"{m['device_ms_per_step']:.2f} ms of {kind} events; top: {top}"]
            if "busy_ms_per_step" in m:
                # bench-gpu's AddTimeline: the same events on one timeline; a gap is time with no
                # event running, named by the events around it.
                gaps = "; ".join(f"after {g['after'][:40]} before {g['before'][:40]} "
                                 f"{g['ms_per_step']:.4f} ms x{g['count_per_step']:.0f}"
                                 for g in m.get("gaps", [])[:4])
                lines += ["", f"Device timeline, {mode} step at {prof['context']}: "
                          f"{m['busy_ms_per_step']:.3f} ms busy of a {m['span_ms_per_step']:.3f} ms "
                          f"span ({m['span_ms_per_step'] - m['busy_ms_per_step']:.3f} ms idle); "
                          f"longest idle: {gaps or 'none'}"]
        by_pass = prof.get("dysco_by_pass")
        if by_pass:
            # bench-gpu's SplitByPass: a kernel's calls of a DySCO step, the first (DySCO calls -
            # plain calls) taken as the speculative pass's; "plain after": the plain step profiled
            # again after the DySCO steps (a control for drift between the profiles).
            parts = "; ".join(
                f"{k['name'][:60]} speculative {k['speculative_calls_per_step']} x "
                f"{k['speculative_ms_per_call']:.4f} ms, real {k['real_calls_per_step']} x "
                f"{k['real_ms_per_call']:.4f} ms (plain {k['plain_ms_per_call']:.4f} ms"
                + (f", plain after {k['plain_after_ms_per_call']:.4f} ms"
                   if k.get("plain_after_ms_per_call") else "") + ")"
                for k in by_pass[:4])
            lines += ["", f"DySCO step by pass at {prof['context']} (ms a call): {parts}"]
    return lines


def ttft_table(benches, peers):
    lines = ["| shape | TTFT tokens | seconds | FLOP floor s | ratio | peer s | ours/peer |",
             "|---|---|---|---|---|---|---|"]
    for b in benches:
        t = b["ttft"]
        peer = peer_for(b, peers)
        p = peer_row(peer, t["tokens"])
        peer_s = p.get("ttft_s") if p else None
        cut = " (cut: --max-prefill-s)" if t.get("cut") else ""
        lines.append(f"| {b.get('label') or b.get('model_name')} | {t['tokens']}{cut} | "
                     f"{t['seconds']:.2f} | {t['floor_s']:.2f} | {t['ratio']:.2f}x | "
                     f"{fmt(peer_s)} | {fmt(ratio(t['seconds'], peer_s), 'x')} |")
    return lines


def bandwidth_ceiling(bench, sessions, context):
    """The most `sessions` concurrent DySCO sessions at `context` tokens can gain over one, if every
    step ran at its bytes floor: a step reads the weights once whatever the batch, and each
    session's KV cache (both passes) for its own. From the bench's own byte counts at the nearest
    measured context; None without them."""
    rows = [r for r in bench.get("contexts", []) if r.get("dysco_bytes")]
    if not rows or not bench.get("kv_bytes_per_token") or not bench.get("num_layers"):
        return None
    r = min(rows, key=lambda x: abs(x["context"] - context))
    # The bench's own count; files written before it had one counted the last probe layer whole.
    passes = bench.get("dysco_kv_passes",
                       1 + (bench.get("probe_last_layer", -1) + 1) / bench["num_layers"])
    kv = r["context"] * bench["kv_bytes_per_token"] * passes
    weights = r["dysco_bytes"] - kv
    return sessions * (weights + kv) / (weights + sessions * kv), r["context"]


def server_summary(server, bench=None):
    """(rows of the table, the N-session / 1-session ratios: window tokens/s, decode tokens/s,
    steady decode tokens/s; the bandwidth ceiling of that ratio or None)."""
    cfg = server["config"]
    phases = server["phases"]
    rows = []
    for ph in phases:
        itl = ph.get("inter_token_latency", {})
        decode_rate = ph["concurrency"] * 1e3 / itl["mean_ms"] if itl.get("mean_ms") else None
        # The median gap between tokens is a step without a prefill chunk in it: the batch's steady
        # decode, which the mean mixes with the steps that also prefill another session's chunk.
        steady_rate = ph["concurrency"] * 1e3 / itl["p50_ms"] if itl.get("p50_ms") else None
        rows.append((ph, decode_rate, steady_rate))
    window_ratio = server.get("throughput_ratio")
    decode_ratio = ratio(rows[-1][1], rows[0][1]) if len(rows) == 2 else None
    steady_ratio = ratio(rows[-1][2], rows[0][2]) if len(rows) == 2 else None
    ceiling = None
    if bench is not None and len(rows) == 2:
        ceiling = bandwidth_ceiling(bench, rows[-1][0]["concurrency"],
                                    cfg["prompt_tokens"] + cfg["max_new_tokens"] // 2)
    lines = [f"{cfg['prompt_tokens']}-token prompts, {cfg['max_new_tokens']} new tokens, DySCO "
             f"{'on' if cfg.get('dysco') else 'off'}, through dysco-server + dysco-client bench:", "",
             "| sessions | generated tok/s (window) | decode tok/s (sessions / mean inter-token) | "
             "steady decode tok/s (sessions / p50 inter-token) | TTFT p50 s | inter-token p50 ms | "
             "errors |", "|---|---|---|---|---|---|---|"]
    for ph, decode_rate, steady_rate in rows:
        lines.append(f"| {ph['concurrency']} | {ph['generated_tokens_per_s']:.1f} | "
                     f"{fmt(decode_rate, digits=1)} | {fmt(steady_rate, digits=1)} | "
                     f"{ph['ttft']['p50_ms'] / 1e3:.2f} | "
                     f"{ph['inter_token_latency']['p50_ms']:.1f} | {ph['errors']} |")
    if window_ratio is not None:
        lines += ["", f"{rows[-1][0]['concurrency']} sessions / 1 session: "
                  f"{window_ratio:.2f}x generated tokens/s over the window (prefill included), "
                  f"{fmt(decode_ratio, 'x')} decode tokens/s, {fmt(steady_ratio, 'x')} steady "
                  f"decode tokens/s (target >= {SESSIONS_TARGET:.0f}x)."]
    if ceiling is not None:
        lines += ["", f"Bandwidth ceiling of that ratio at {ceiling[1]} tokens (every step at its "
                  f"bytes floor; the weights read once a step, each session's KV of both passes "
                  f"its own): {ceiling[0]:.2f}x."]
    return lines, window_ratio, decode_ratio, steady_ratio, ceiling[0] if ceiling else None


def qwen_benches(benches):
    """The benches of the Qwen3-8B shape, the one issue 9's targets and the server run are about."""
    return [b for b in benches if "qwen3" in (b.get("label") or b.get("model_name") or "").lower()
            or b.get("architecture") == "qwen3"]


def targets(benches, servers):
    """Issue 9's targets on the Qwen3-8B shape: met / missed lines."""
    out = []
    qwen = qwen_benches(benches)
    for b in qwen[:1]:
        for r in b["contexts"]:
            out.append(f"- plain at {r['context']}: {r['plain_ratio']:.2f}x its floor "
                       f"(target <= {PLAIN_TARGET}x): {'met' if r['plain_ratio'] <= PLAIN_TARGET else 'missed'}")
            if r.get("dysco_ratio") is not None:
                out.append(f"- DySCO at {r['context']}: {r['dysco_ratio']:.2f}x its floor "
                           f"(target <= {DYSCO_TARGET}x): "
                           f"{'met' if r['dysco_ratio'] <= DYSCO_TARGET else 'missed'}")
        longest = max(b["contexts"], key=lambda r: r["context"], default={})
        if longest.get("dysco_over_plain") is not None and longest["context"] >= 131072:
            out.append(f"- DySCO/plain at {longest['context']}: {longest['dysco_over_plain']:.2f}x "
                       f"(target <= {DYSCO_OVER_PLAIN_128K}x): "
                       f"{'met' if longest['dysco_over_plain'] <= DYSCO_OVER_PLAIN_128K else 'missed'}")
        t = b["ttft"]
        out.append(f"- {t['tokens']}-token prefill: {t['ratio']:.2f}x the FLOP floor (target <= "
                   f"{TTFT_TARGET}x): {'met' if t['ratio'] <= TTFT_TARGET else 'missed'}")
    for s in servers[:1]:
        _, window_ratio, decode_ratio, steady_ratio, ceiling = server_summary(
            s, qwen[0] if qwen else None)
        best = max(x for x in (window_ratio, decode_ratio, steady_ratio, 0) if x is not None)
        above = (f"; the bandwidth ceiling is {ceiling:.2f}x, below the target"
                 if ceiling is not None and ceiling < SESSIONS_TARGET else "")
        out.append(f"- {s['config']['concurrency']} sessions: {fmt(window_ratio, 'x')} (window), "
                   f"{fmt(decode_ratio, 'x')} (decode), {fmt(steady_ratio, 'x')} (steady decode) "
                   f"one session's tokens/s (target >= {SESSIONS_TARGET:.0f}x{above}): "
                   f"{'met' if best >= SESSIONS_TARGET else 'missed'}")
    return out


def table(benches, peers, servers):
    lines = ["## GPU benchmark (issue 9)", ""]
    for b in benches:
        lines += decode_table(b, peer_for(b, peers)) + [""]
    for p in peers:
        if p.get("contexts") and not any(peer_for(b, [p]) for b in benches):  # no numbers of ours
            lines += [f"Peer only ({p.get('model_name')}): " + ", ".join(
                f"{r['context']}: {fmt(r.get('per_token_ms_p50'))} ms" for r in p["contexts"]), ""]
        for e in p.get("errors", []):
            lines.append(f"- peer error: {e}")
        if p.get("errors"):
            lines.append("")
    if benches:
        lines += ["### TTFT", ""] + ttft_table(benches, peers) + [""]
    for s in servers:
        qwen = qwen_benches(benches) or benches
        lines += (["### Concurrent DySCO sessions", ""] +
                  server_summary(s, qwen[0] if qwen else None)[0] + [""])
    t = targets(benches, servers)
    if t:
        lines += ["### Targets (Qwen3-8B shape)", ""] + t + [""]
    return "\n".join(lines)


def plot(benches, peers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(6.5 * max(1, len(benches)), 4.8),
                             squeeze=False)
    for ax, b in zip(axes[0], benches):
        ctx = [r["context"] for r in b["contexts"]]
        ax.plot(ctx, [r["plain_ms_p50"] for r in b["contexts"]], "o-", color="C0", label="plain")
        ax.plot(ctx, [r["plain_floor_ms"] for r in b["contexts"]], "--", color="C0",
                label="plain floor")
        if b.get("dysco"):
            ax.plot(ctx, [r["dysco_ms_p50"] for r in b["contexts"]], "s-", color="C1", label="DySCO")
            ax.plot(ctx, [r["dysco_floor_ms"] for r in b["contexts"]], "--", color="C1",
                    label="DySCO floor")
        peer = peer_for(b, peers)
        if peer:
            pts = [(r["context"], r["per_token_ms_p50"]) for r in peer["contexts"]
                   if r.get("per_token_ms_p50") is not None]
            if pts:
                compiled = all(r.get("compiled") for r in peer["contexts"] if "compiled" in r)
                ax.plot([x for x, _ in pts], [y for _, y in pts], "^-", color="C2",
                        label="transformers" + (" (static cache + compile)" if compiled
                                                else " (static cache)"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx)
        ax.set_xticklabels([f"{c // 1024}K" if c >= 1024 else str(c) for c in ctx])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per token (batch 1, p50)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{b.get('label') or b.get('model_name')}, {b.get('dtype')}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", help="write the markdown table here")
    ap.add_argument("--png", help="write the latency plot here (needs matplotlib)")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    benches, peers, servers = load(args.files)
    benches.sort(key=lambda b: b.get("label") or "")
    text = table(benches, peers, servers)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.png:
        if not benches:
            print("plot_gpu: no bench-gpu results to plot", file=sys.stderr)
            return 1
        plot(benches, peers, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
