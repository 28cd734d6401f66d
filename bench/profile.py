#!/usr/bin/python3
"""Summarises `perf script` output of a whole-machine profile (perf record -a -g).

Reads perf script text on stdin and writes:
  - <out>.folded: folded stacks ("thread;outer;...;inner count"), for any flame-graph
    renderer (inferno-flamegraph, flamegraph.pl);
  - on stdout: each thread name's share of the samples per second of the run (to find a
    phase), then, within the window asked for, each thread's share and the functions with
    the largest inclusive share (the CPU spent in them and what they call).

Usage: perf script -F comm,pid,tid,time,ip,sym,dso -i perf.data | bench/profile.py OUT [FROM_S TO_S]
"""

import argparse
import collections
import re
import sys

# Frames that only carry others (closures, unwinding guards, thread starts), left out of the
# function list unless --all-frames; they stay in the folded stacks.
PLUMBING = re.compile(
    r"closure|catch_unwind|do_call|call_once|__rust_begin_short_backtrace|"
    r"^std::sys::backtrace|^start_thread$|^clone3$|thread_start|^\[unknown\]$|^_start$|"
    r"^__libc_start|^main$|^entry_SYSCALL|^do_syscall_64$|with_budget|^budget|"
    r"^poll_future|^with_mut|^enter_runtime|^set_scheduler|^try_with|^with<|^set<"
)
HEADER = re.compile(r"^(.*?)\s+(\d+)(?:/(\d+))?\s+(?:\[\d+\]\s+)?([\d.]+):")


def samples(lines):
    """Yields (thread name, process id, seconds since the first sample, frames outermost
    first)."""
    comm, pid, at, frames, start = None, None, None, [], None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None and at is not None:
                yield comm, pid, at - start, list(reversed(frames))
            comm, pid, at, frames = None, None, None, []
            continue
        if not line[0].isspace():
            match = HEADER.match(line)
            if match:
                comm, pid, at = match.group(1).strip(), match.group(2), float(match.group(4))
                start = at if start is None else start
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            symbol = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].rsplit(" (", 1)[0])
            frames.append(symbol[:120].replace(";", ","))
    if comm is not None and at is not None:
        yield comm, pid, at - start, list(reversed(frames))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="prefix of the folded-stacks file")
    parser.add_argument("window", nargs="*", type=float, help="FROM_S TO_S")
    parser.add_argument("--top", type=int, default=25, help="functions listed per thread")
    parser.add_argument("--all-frames", action="store_true", help="list plumbing frames too")
    args = parser.parse_args()
    low, high = (args.window + [0.0, float("inf")])[:2] if args.window else (0.0, float("inf"))

    per_second = collections.defaultdict(collections.Counter)
    threads = collections.Counter()
    processes = collections.Counter()
    names = {}
    inclusive = collections.defaultdict(collections.Counter)
    folded = collections.Counter()
    total = 0
    for comm, pid, at, frames in samples(sys.stdin):
        per_second[int(at)][comm] += 1
        if not low <= at <= high:
            continue
        total += 1
        threads[comm] += 1
        processes[pid] += 1
        names.setdefault(pid, collections.Counter())[comm] += 1
        folded[";".join([comm] + frames)] += 1
        for frame in set(frames):
            if args.all_frames or not PLUMBING.search(frame):
                inclusive[comm][frame] += 1

    with open(args.out + ".folded", "w", encoding="utf-8") as out:
        for stack, count in folded.items():
            out.write(f"{stack} {count}\n")

    print("Per second: the threads with most samples (% of the machine)")
    for second in sorted(per_second):
        counts = per_second[second]
        all_ = sum(counts.values())
        top = "  ".join(f"{c[:16]} {100 * n // all_}" for c, n in counts.most_common(5))
        print(f"{second:5d} s  {top}")
    if not total:
        print("no samples in the window")
        return
    print(f"\nWindow {low:g}-{high:g} s: {total} samples\n\nBy process (its busiest threads)")
    for pid, count in processes.most_common(8):
        busiest = ", ".join(f"{c} {100 * n / total:.1f}" for c, n in names[pid].most_common(4))
        print(f"{100 * count / total:5.1f} %  pid {pid}: {busiest}")
    for comm, count in threads.most_common(8):
        print(f"\n{100 * count / total:5.1f} %  {comm}")
        for frame, n in inclusive[comm].most_common(args.top):
            print(f"        {100 * n / total:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
