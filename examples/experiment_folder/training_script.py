"""The seed's training script: it reads its data folder like any local folder.

Run by `datastore run examples/experiment.yaml --local` (or by the cluster's run Job) as

    python training_script.py --data_folder <path> --output_dir <path> --regularization 0.1

Only the standard library: it runs on any python3, in any image with python.
"""

import argparse
import csv
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--data_folder", type=str, required=True, help="the training data")
parser.add_argument("--output_dir", type=str, default="outputs", help="where the model goes")
parser.add_argument("--regularization", type=float, default=0.01)
args = parser.parse_args()

print("Data folder:", args.data_folder)
for root, _, files in sorted(os.walk(args.data_folder)):
    for name in sorted(files):
        path = os.path.join(root, name)
        print("  ", os.path.relpath(path, args.data_folder), os.path.getsize(path), "bytes")

# "Training": the mean of each feature per species, shrunk towards the overall mean by the
# regularization strength.
with open(os.path.join(args.data_folder, "iris.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
features = [k for k in rows[0] if k != "species"]
overall = {k: sum(float(r[k]) for r in rows) / len(rows) for k in features}
model = {}
for species in sorted({r["species"] for r in rows}):
    members = [r for r in rows if r["species"] == species]
    model[species] = {
        k: round(
            (1 - args.regularization) * sum(float(r[k]) for r in members) / len(members)
            + args.regularization * overall[k],
            4,
        )
        for k in features
    }

os.makedirs(args.output_dir, exist_ok=True)
with open(os.path.join(args.output_dir, "model.json"), "w") as f:
    json.dump(model, f, indent=2, sort_keys=True)
with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
    json.dump({"rows": len(rows), "species": len(model), "regularization": args.regularization}, f)
print("Trained on", len(rows), "rows; model written to", args.output_dir)
