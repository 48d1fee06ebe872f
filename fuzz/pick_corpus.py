"""Picks the few fuzzer-found inputs worth committing.

libFuzzer's own merge keeps hundreds of inputs; this keeps the committed
seeds and adds at most N inputs, greedily, each time the one that covers
the most features the corpus does not cover yet (the smaller on ties).
The features come from a set-cover merge's control file, run with edge
coverage only, so that a feature is (about) an edge:

    B=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/decode_event
    mkdir /tmp/fz/out
    $B -set_cover_merge=1 -use_counters=0 -use_value_profile=0 \
       -merge_control_file=/tmp/fz/ctl /tmp/fz/out \
       fuzz/corpus/decode_event /tmp/fz/decode_event
    python3 fuzz/pick_corpus.py /tmp/fz/ctl 50 fuzz/corpus/decode_event

The picks are copied into the seed directory under their SHA-1 (as
cargo-fuzz names them). Check the result with `$B -runs=0 <dir>` (cov).
"""
import hashlib
import os
import shutil
import sys

ctl, n_max, seed_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = open(ctl).read().split("\n")
n_files = int(lines[0])
paths = lines[2 : 2 + n_files]
features = {}
for line in lines[2 + n_files :]:
    p = line.split()
    if p and p[0] == "FT":
        features[int(p[1])] = set(p[2:])
seed_ids = {i for i in range(n_files) if paths[i].startswith(seed_dir)}
covered = set().union(*(features.get(i, set()) for i in seed_ids))
seeds = len(covered)
everything = set().union(*features.values())
cands = [i for i in features if i not in seed_ids]
chosen = []
while len(chosen) < n_max and cands:
    best = max(cands, key=lambda i: (len(features[i] - covered), -os.path.getsize(paths[i])))
    if not features[best] - covered:
        break
    covered |= features[best]
    chosen.append(best)
    cands.remove(best)
print(f"features: seeds {seeds}, all inputs {len(everything)}, seeds + {len(chosen)} picks {len(covered)}")
for i in chosen:
    data = open(paths[i], "rb").read()
    shutil.copy(paths[i], os.path.join(seed_dir, hashlib.sha1(data).hexdigest()))
