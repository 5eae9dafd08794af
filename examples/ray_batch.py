"""Segment a folder (or s3:// / gs:// prefix) with Ray Data's map_batches and fusionseg.BatchPredictor.

    pip install 'fusionseg[ray]'               # ray, pyarrow and pandas (Ray Data needs all three)
    python examples/ray_batch.py ../shared/data/msrc_v2/images --classes "grass, cow, sky" --out preds.parquet

Each actor loads the model once (the BatchPredictor constructor); batches of encoded files flow to it and
rows come back with per-class pixel fractions and the label map as PNG bytes. On a cluster: ``ray.init("auto")``
(or ``RAY_ADDRESS=...``), ``--gpus 1`` per actor, and an output URI every node can write (s3://..., gs://...).
For the ready-made resumable job with one index row per image, see ``fusionseg segment --engine ray``.
Read the output back with e.g. ``pandas.read_parquet("preds.parquet")``.
"""
import argparse

import ray

from fusionseg import BatchPredictor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="+", help="folders, files or URIs of images (read_binary_files understands "
                                           "s3://, gs://, local paths)")
    ap.add_argument("--classes", required=True)
    ap.add_argument("--out", required=True, help="Parquet output folder or URI")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor")
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    ray.init()  # or ray.init(address="auto") on a cluster
    # Columns: bytes, path (the predictor segments the bytes; the path is the row's name). The reads are I/O and
    # take no CPU: a 1-CPU read would otherwise wait forever when the actors hold every core (actors = cores).
    ds = ray.data.read_binary_files(a.src, include_paths=True, num_cpus=0)
    preds = ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"classes": a.classes, "output": "png",
                               "device": "cuda" if a.gpus else "cpu", "threads": 1 if a.gpus else 0},
        batch_size=a.batch_size, concurrency=a.actors, num_gpus=a.gpus)
    # 'fractions'/'mean_scores' are (batch, n_classes) arrays in BatchPredictor.classes order
    preds.write_parquet(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
