"""The report of tracing_bench.py: its runs' results, as the lines it prints.

Each figure is judged as a loss against tracing off (paired_line: against tracing
paused in the same processes), of throughput or of a CPU-bound server (1 - CPU off /
CPU with tracing), with the targets <= 3% at sampling 0.01 and <= 15% at 1.0.
"""

from __future__ import annotations

import collections
import pathlib
import statistics
from typing import Any

from _common import say, verdict

from streamwise.tracing import viewer

MODES = ("off", "0.01", "1.0")
LOSS_MAX_PERCENT = {"0.01": 3.0, "1.0": 15.0}


def _fmt(rate: float, unit: str) -> str:
    return f"{rate:,.0f} {unit}"


def _loss(off: float, rate: float) -> float:
    return (off - rate) / off * 100


def span_stats(traces_dir: str, calls: dict[str, int], streams: list[int]) -> dict[str, Any]:
    """What the exporter wrote into ``traces_dir`` (read after shutdown), related to
    the ``calls`` made of each method and to the items asked of each stream."""
    files = list(pathlib.Path(traces_dir).glob("*.jsonl"))
    stats: dict[str, Any] = {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "spans": 0,
        "by_call": {},
        "stream_items_ok": None,
    }
    if not files:
        return stats
    spans = viewer.load(traces_dir)
    stats["spans"] = len(spans)
    by_call: collections.Counter[str] = collections.Counter()
    recorded_items = []
    for span in spans:
        call = span.name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]  # "route Bench.echo", "swbench.Bench/Unary"
        by_call[call if call in ("echo", "items", "Unary") else "other"] += 1
        if span.name == "Bench.items":  # the replica's span of a stream counts its items
            recorded_items.append(span.record["attributes"].get("streamwise.items"))
    stats["by_call"] = {
        name: {"spans": by_call.get(name, 0), "calls": calls.get(name, 0)} for name in (*calls, "other")
    }
    if recorded_items:
        # When every stream was sampled, each replica span must record its whole stream.
        stats["stream_items_ok"] = sorted(recorded_items) == sorted(streams)
    return stats


def by_round(runs: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """The runs of each round, by mode."""
    rounds: dict[int, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
    for r in runs:
        rounds[r["round"]][r["mode"]] = r
    return [rounds[k] for k in sorted(rounds)]


def _losses(rounds: list[dict[str, dict[str, Any]]], mode: str, key: str) -> list[float]:
    """The loss of ``mode`` against "off" of the same round, one per round."""
    return [_loss(r["off"][key], r[mode][key]) for r in rounds]


def figure_line(label: str, rounds: list[dict[str, dict[str, Any]]], key: str, unit: str) -> str:
    off = statistics.median(r["off"][key] for r in rounds)
    parts = [f"{label:<30}off {_fmt(off, unit):>17}"]
    for mode in MODES[1:]:
        rate = statistics.median(r[mode][key] for r in rounds)
        losses = _losses(rounds, mode, key)
        loss = statistics.median(losses)
        target = LOSS_MAX_PERCENT[mode]
        parts.append(
            f"{mode:>4} {_fmt(rate, unit):>17} loss {loss:5.1f}% (rounds {min(losses):.0f}..{max(losses):.0f}%, "
            f"target <= {target:g}%) {verdict(loss <= target):<4}"
        )
    return "   ".join(parts).rstrip()


def progress(round_no: int, rounds: int, r: dict[str, Any]) -> str:
    return (
        f"  round {round_no}/{rounds} {r['mode']:>4}: handle {_fmt(r['handle_unary'], 'calls/s'):>13}  "
        f"stream {_fmt(r['stream'], 'items/s'):>17}  ingress {_fmt(r['ingress_unary'], 'req/s'):>11}  "
        f"({r['trace']['spans']:,} spans, {r['trace']['bytes'] / 1e6:.1f} MB written; "
        f"load {r['load']:.2f} at start, {r['seconds']:.1f} s)"
    )


def cpu_line(label: str, rounds: list[dict[str, dict[str, Any]]], key: str) -> str:
    """CPU per call of each mode, and the throughput a CPU-bound server would lose:
    per round, each driver run's median against that of "off" in the same round; the
    median of rounds."""

    def cpu(run: dict[str, Any]) -> float:
        return statistics.median(run["cpu"][key])

    off = statistics.median(cpu(r["off"]) for r in rounds)
    parts = [f"{'  for reference':<30}CPU per {label} call (driver + replica, median): off {off * 1e6:.0f} us"]
    for mode in MODES[1:]:
        used = statistics.median(cpu(r[mode]) for r in rounds)
        loss = statistics.median((1 - cpu(r["off"]) / cpu(r[mode])) * 100 for r in rounds)
        parts.append(f"{mode} {used * 1e6:.0f} us (CPU-bound loss {loss:.1f}%)")
    return ", ".join(parts)


def hop_line(path: str, rounds: list[dict[str, dict[str, Any]]], key: str) -> str:
    """Tracing's own work per call on ``path`` (timed alone: _tracing_work), and the
    throughput a CPU-bound server loses to it: added / (CPU per call off + added), per
    round against "off" of the same round; the median of rounds."""

    def cpu_off(r: dict[str, dict[str, Any]]) -> float:
        return statistics.median(r["off"]["cpu"][key])

    off = statistics.median(r["off"]["hop"][path] for r in rounds)
    parts = [f"{f'work per {path} call':<30}tracing helpers alone, both ends: baseline off {off * 1e6:.1f} us"]
    for mode in MODES[1:]:
        added = [r[mode]["hop"][path] - r["off"]["hop"][path] for r in rounds]
        losses = [a / (cpu_off(r) + a) * 100 for a, r in zip(added, rounds)]
        loss = statistics.median(losses)
        target = LOSS_MAX_PERCENT[mode]
        parts.append(
            f"{mode} {statistics.median(added) * 1e6:+.1f} us (CPU-bound loss {loss:.1f}%, rounds "
            f"{min(losses):.1f}..{max(losses):.1f}%, target <= {target:g}%) {verdict(loss <= target)}"
        )
    return "   ".join(parts)


def profile_line(path: str, shares: dict[str, Any]) -> str:
    """The share of CPU samples in tracing code on ``path``, per mode; over "off", as a
    loss of a CPU-bound server, judged against the targets."""
    label = f"{f'in tracing code, {path}':<30}"
    skipped = [why for why in shares.values() if isinstance(why, str)]
    if skipped:
        return f"{label}skipped: {skipped[0]}"
    off = shares["off"][0] / shares["off"][1]
    parts = [f"{f'in tracing code, {path}':<30}py-spy samples of driver + replica: off {off * 100:.2f}%"]
    for mode in MODES[1:]:
        hits, total = shares[mode]
        loss = (hits / total - off) / (1 - off) * 100
        target = LOSS_MAX_PERCENT[mode]
        parts.append(
            f"{mode} {hits / total * 100:.2f}% of {total:,} (CPU-bound loss {loss:.1f}%, target <= {target:g}%) "
            f"{verdict(loss <= target)}"
        )
    return "   ".join(parts)


def _per_call(stats: dict[str, Any], call: str) -> str:
    entry = stats["by_call"].get(call, {"spans": 0, "calls": 0})
    if not entry["calls"]:
        return "no calls"
    return f"{entry['spans'] / entry['calls']:.3g} spans/call ({entry['spans']:,} for {entry['calls']:,})"


def report(runs: list[dict[str, Any]], *, reps: int, stream_items: int, concurrency: int) -> None:
    """Print the figures of all rounds' ``runs`` (each the best of ``reps`` measurements)."""
    rounds = by_round(runs)
    say(
        f"median of {len(rounds)} round(s), each mode the best of {reps} measurement(s) per figure; "
        f"loss = (off - mode) / off, against off of the same round"
    )
    say(figure_line(f"handle unary {concurrency} concurrent", rounds, "handle_unary", "calls/s"))
    say(figure_line(f"handle stream {stream_items:,} items", rounds, "stream", "items/s"))
    say(figure_line(f"ingress unary {concurrency} concurrent", rounds, "ingress_unary", "req/s"))

    for key, label in (("handle_unary", "handle unary"), ("ingress_unary", "ingress unary")):
        say(cpu_line(label, rounds, key))
    for path, key in (("handle", "handle_unary"), ("ingress", "ingress_unary")):
        say(hop_line(path, rounds, key))

    # Per call, not per item: every call at 1.0 writes the same spans, whatever it streams.
    full = [r["trace"] for r in runs if r["mode"] == "1.0"]
    unary_spans = sum(t["by_call"]["echo"]["spans"] for t in full)
    unary_calls = sum(t["by_call"]["echo"]["calls"] for t in full)
    stream_spans = sum(t["by_call"]["items"]["spans"] for t in full)
    stream_calls = sum(t["by_call"]["items"]["calls"] for t in full)
    items_ok = all(t["stream_items_ok"] for t in full)
    per_unary = unary_spans / unary_calls if unary_calls else 0.0
    per_stream = stream_spans / stream_calls if stream_calls else 0.0
    ok = stream_calls > 0 and per_stream == per_unary == 2.0 and items_ok
    stream_extra_ms = statistics.median((1 / r["1.0"]["stream"] - 1 / r["off"]["stream"]) * stream_items * 1e3 for r in rounds)
    unary_extra_us = statistics.median((1 / r["1.0"]["handle_unary"] - 1 / r["off"]["handle_unary"]) * 1e6 for r in rounds)
    say(
        f"{'per call, not per item':<30}at 1.0: {per_stream:.3g} spans per stream ({stream_calls} streams, of up to "
        f"{stream_items:,} items), {per_unary:.3g} per unary handle call (route + replica); every replica "
        f"span counted its stream's items: {'yes' if items_ok else 'NO'}  {verdict(ok)}"
    )
    say(
        f"{'  for reference':<30}time added at 1.0 (median of rounds): {stream_extra_ms:+.1f} ms per "
        f"{stream_items:,}-item stream ({stream_extra_ms * 1e6 / stream_items:+.0f} ns/item); "
        f"{unary_extra_us:+.1f} us per unary handle call, amortized over {concurrency} concurrent"
    )
    for mode in MODES[1:]:
        traces = [r["trace"] for r in runs if r["mode"] == mode]
        n = len(traces)
        say(
            f"{f'  exporter at {mode}':<30}jsonl: {sum(t['spans'] for t in traces) / n:,.0f} spans, "
            f"{sum(t['bytes'] for t in traces) / n / 1e6:.1f} MB per driver run; handle unary "
            f"{_per_call(traces[0], 'echo')}, ingress unary {_per_call(traces[0], 'Unary')} (first run)"
        )


def paired_line(label: str, mode: str, rows: list[list[float]], target: float) -> str:
    """The losses of tracing on against paused, per pair: of a CPU-bound server
    (1 - CPU paused / CPU on) and of throughput; mean and twice its standard error."""

    def mean_2se(xs: list[float]) -> str:
        spread = 2 * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
        return f"{statistics.mean(xs):.1f}% +- {spread:.1f}"

    cpu = [(1 - paused / on) * 100 for paused, on, _, _ in rows]
    rate = [(1 - on / paused) * 100 for _, _, paused, on in rows]
    cpu_paused = statistics.median(row[0] for row in rows) * 1e6
    return (
        f"{label:<30}{mode}, on vs paused in the same processes, {len(rows)} pairs (CPU paused {cpu_paused:.0f} us/call): "
        f"CPU-bound loss {mean_2se(cpu)}, throughput loss {mean_2se(rate)} (mean +- 2 s.e., target <= {target:g}%) "
        f"{verdict(statistics.mean(cpu) <= target and statistics.mean(rate) <= target)}"
    )
