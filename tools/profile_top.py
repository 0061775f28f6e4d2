"""Summarize a py-spy raw profile: the frames with the most samples, self and inclusive.

    py-spy record --native -r 250 -d 5 -f raw -o PROFILE.raw -p PID
    python tools/profile_top.py PROFILE.raw [--top 25] [--threads-without FRAME]

Each line of a raw (collapsed) profile is "frame;frame;...;frame COUNT". Samples whose stack
contains --threads-without (default: Thread._bootstrap, trio's idle worker threads) are left
out, so percentages are of the main thread's samples. Frame names are shortened to
"function (file)". docs/profile.md quotes this script's output.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_LOCATION = re.compile(r"\s*\((?:[^)]*/)?([^/:)]+)(?::\d+)?\)")


def short(frame: str) -> str:
    """'pump (/x/y/_pump.py:123)' -> 'pump (_pump.py)'."""
    return _LOCATION.sub(r" (\1)", frame, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads-without", default="Thread._bootstrap")
    args = parser.parse_args(argv)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or (args.threads_without and args.threads_without in stack):
                continue
            n = int(count)
            frames = [short(f) for f in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"--- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
