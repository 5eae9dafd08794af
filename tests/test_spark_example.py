"""examples/spark_batch.py's make_predict_fn under Spark's own predict_batch_udf, on a local SparkSession.

pyspark is large and not installed by scripts/setup.sh or CI (`pip install 'fusionseg[spark]'`), so this module
is skipped there; it also needs Java 17+ on PATH.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO, shared_data

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'fusionseg[spark]'; not in CI: it is large)")
pytest.importorskip("pandas", reason="predict_batch_udf needs pandas (pip install 'fusionseg[spark]')")
pytest.importorskip("pyarrow", reason="predict_batch_udf needs pyarrow (pip install 'fusionseg[spark]')")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java 17+ on PATH", allow_module_level=True)

NAMES = "grass, cow, sky"


def _example():
    spec = importlib.util.spec_from_file_location("spark_batch", REPO / "examples" / "spark_batch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~35 s here: a JVM, a Python worker and the model loaded in it
def test_predict_batch_udf_gives_the_batch_predictor_fractions(tmp_path, monkeypatch):
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType

    from fusionseg import BatchPredictor

    example = _example()
    photos = [str(p) for p in sorted(shared_data("msrc_v2/images").glob("1_1*_s.jpg"))[1:5]]  # grass and a cow on each
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = photos + [str(bad)]
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # the workers need this venv, not PATH's python3
    spark = (SparkSession.builder.master("local[1]").appName("fusionseg-test")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1").getOrCreate())
    try:
        segment = predict_batch_udf(example.predict_fn_factory(NAMES), return_type=ArrayType(FloatType()),
                                    batch_size=2)
        df = spark.createDataFrame([(p,) for p in paths], ["path"])
        rows = {r["path"]: np.array(r["fractions"], np.float64) for r in df.withColumn("fractions", segment("path")).collect()}
    finally:
        spark.stop()
    assert sorted(rows) == sorted(paths)
    # The example's predictor runs torch on one thread; so does this reference (a thread count can flip a tie).
    ref = BatchPredictor(NAMES, output="none", threads=1)({"path": np.array(paths)})
    assert list(ref["status"]) == ["ok"] * 4 + ["error"]
    for i, p in enumerate(paths):
        assert rows[p].shape == (3,)
        assert np.allclose(rows[p], ref["fractions"][i], atol=1e-6)  # float32 in Spark
    assert rows[str(bad)].sum() == 0  # an unreadable image gives zeros, the others still come back
    assert all(rows[p][0] > 0.3 and rows[p][1] > 0.05 for p in photos)  # grass and a cow on each of these photos
