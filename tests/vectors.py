"""The known-answer vectors in tests/data/packets (captured from the C binaries)."""

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKET_DIR = os.path.join(ROOT, "tests", "data", "packets")


def load_vectors():
    """{case name: vector dict} for every tests/data/packets/*.json."""
    cases = {}
    for path in sorted(glob.glob(os.path.join(PACKET_DIR, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        cases[data["case"]] = data
    return cases
