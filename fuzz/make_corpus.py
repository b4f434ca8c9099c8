#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/attention_fuzz.cpp into fuzz/corpus/ (deterministic).

The harness reads its choices from the input's bytes and, once they are used up, from a stream
seeded by the input, so any byte string is a complete test case (entry point, dtype, shapes,
strides, options, mutations); the seeds only need to be varied: random bytes in three length
classes (short inputs leave most choices to the seeded stream, long ones let libFuzzer's
mutations steer them), plus a few fixed patterns.
Usage: python3 fuzz/make_corpus.py
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        os.remove(os.path.join(OUT, name))
    rng = random.Random(20240607)
    n = 0
    for length in (24, 96, 320):
        for _ in range(12):
            data = bytes(rng.randrange(256) for _ in range(length))
            with open(os.path.join(OUT, f"seed-{n:02d}"), "wb") as f:
                f.write(data)
            n += 1
    for pattern in (b"\x00" * 64, b"\xff" * 64, bytes(range(256)), bytes(range(255, -1, -1))):
        with open(os.path.join(OUT, f"seed-{n:02d}"), "wb") as f:
            f.write(pattern)
        n += 1
    print(f"wrote {n} files to {OUT}")


if __name__ == "__main__":
    main()
