"""Per-class pixel fractions for a Spark DataFrame of image paths, with predict_batch_udf + BatchPredictor.

    pip install fusionseg pyspark
    spark-submit examples/spark_batch.py paths.txt --classes "grass, cow, sky"

Not run by the test suite (pyspark is not installed on the test machine); the predictor call it makes,
``BatchPredictor(...)({"path": array_of_paths})``, is the one tests/test_batch_predictor.py checks.
make_predict_fn runs once per Python worker, so the model loads once per worker, not per batch.
"""
import argparse

import numpy as np
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import SparkSession
from pyspark.sql.types import ArrayType, FloatType


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", help="text file: one image path or URI per line")
    ap.add_argument("--classes", required=True)
    ap.add_argument("--out", default="fractions.parquet")
    a = ap.parse_args()
    classes = a.classes

    def make_predict_fn():
        from fusionseg import BatchPredictor
        predictor = BatchPredictor(classes, output="none", threads=1)

        def predict(paths: np.ndarray) -> np.ndarray:
            out = predictor({"path": paths})
            return out["fractions"].astype(np.float32)  # (batch, n_classes); an unreadable image gives zeros

        return predict

    spark = SparkSession.builder.appName("fusionseg").getOrCreate()
    segment = predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()), batch_size=8)
    df = spark.read.text(a.paths).withColumnRenamed("value", "path")
    df.withColumn("fractions", segment("path")).write.mode("overwrite").parquet(a.out)
    print(f"wrote {a.out}; fractions are in the order of: {classes}")


if __name__ == "__main__":
    main()
