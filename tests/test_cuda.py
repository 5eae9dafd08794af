"""CUDA paths (run where a GPU is present; skipped elsewhere): training with bf16 autocast, prediction on cuda."""
import numpy as np
import pytest
import torch

from fusionseg.data.datasets import FolderDataset
from fusionseg.engine.train import TrainConfig, train
from fusionseg.segmenter import Segmenter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@needs_cuda
def test_train_and_predict_on_cuda_match_cpu(shapes_dataset, tmp_path):
    cfg = TrainConfig(data=[str(shapes_dataset)], out=str(tmp_path / "run"), image_encoder="test-pool",
                      text_encoder="test-hash", preset="tiny", steps=300, batch_size=8, lr=3e-3, warmup=20,
                      size=128, val_fraction=0.0, cache_dir=str(tmp_path / "cache"), progress=False, device="cuda")
    final = train(cfg)
    gpu = Segmenter.from_pretrained(final, device="cuda")
    cpu = Segmenter.from_pretrained(final, device="cpu")
    assert next(gpu.model.head.parameters()).is_cuda
    agree, ious = [], []
    for s in FolderDataset(shapes_dataset):
        a = gpu.predict(s.image, ["square", "disc"])
        b = cpu.predict(s.image, ["square", "disc"])
        agree.append((a.labels == b.labels).mean())
        g = s.mask == 1
        ious.append(((a.labels == 1) & g).sum() / max(1, ((a.labels == 1) | g).sum()))
    assert np.mean(agree) > 0.97, np.mean(agree)  # bf16 on GPU vs fp32 on CPU
    assert np.mean(ious) > 0.8, np.mean(ious)


def test_segmenter_refuses_cuda_when_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Segmenter.from_pretrained("default", device="cuda")


@needs_cuda
def test_label_map_resampling_on_cuda_matches_cpu():
    """labelmap on CUDA tensors (Segmenter on a GPU) gives the CPU's labels."""
    import torch.nn.functional as F
    from fusionseg.segmenter import labels_from_logits
    g = torch.Generator().manual_seed(0)
    for n in (1, 6):
        lg = F.interpolate(torch.randn(1, n, 4, 5, generator=g), size=(16, 20), mode="bilinear")[0] * 4
        a = labels_from_logits(lg, (200, 160), 0.5)
        b = labels_from_logits(lg.cuda(), (200, 160), 0.5)
        assert (a[0] == b[0]).mean() > 0.999 and np.abs(a[1] - b[1]).max() < 1e-4
