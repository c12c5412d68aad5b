"""Regenerate the demo dataset (committed) and build the demo base model (not committed).

python scripts/make_demo_assets.py             # both
python scripts/make_demo_assets.py --dataset   # only data/demo/instructions.jsonl
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmtune.config import DEMO_DATASET_PATH, DEMO_MODEL_PATH  # noqa: E402
from llmtune.demo import DEMO_DATASET_ROWS, ensure_demo_model, make_demo_rows, write_jsonl  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="store_true", help="only rewrite the dataset")
    args = parser.parse_args()
    print(write_jsonl(make_demo_rows(DEMO_DATASET_ROWS, seed=0), ROOT / DEMO_DATASET_PATH))
    if not args.dataset:
        print(ensure_demo_model(ROOT / DEMO_MODEL_PATH))
