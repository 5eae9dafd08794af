"""Training-free bridge: novel-name discrimination on MSRC-v2 (pixels of cow, sheep, cat, dog, boat, flower
assigned among those six names; chance 1/6). Usage: python scripts/bridge_discrimination.py [SIZE]
Prints mean per-class accuracy per top-k. Reads ../shared/data/msrc_v2."""
import numpy as np, torch, torch.nn.functional as F, time, sys
from fusionseg.data.datasets import FolderDataset
from fusionseg.encoders.base import build_image_encoder, build_text_encoder
from fusionseg.textcache import build_bridge
from fusionseg.data.transforms import resize_image, to_tensor, pad_to, round_up
torch.set_num_threads(2)
enc = build_image_encoder("efficientnet-lite0"); txt = build_text_encoder("minilm-l6")
t0 = time.time(); br = build_bridge(enc, txt, top_k=10); print("bridge build", round(time.time()-t0,1), "s")
ds = FolderDataset("../shared/data/msrc_v2")
novel = ["cow", "sheep", "cat", "dog", "boat", "flower"]
ids = [ds.class_names.index(n) + 1 for n in novel]
q = txt.encode(novel, "default")
size = int(sys.argv[1]) if len(sys.argv) > 1 else 320
res = {}
for k in (1, 5, 10, 1000):
    br.top_k = k
    conf = np.zeros((6, 6))
    for i in range(len(ds)):
        m = ds.load_mask(ds.ids[i])
        if not np.isin(m, ids).any(): continue
        s = ds[i]
        img = resize_image(s.image, size); x = enc.normalize(to_tensor(img)[None]); h, w = x.shape[-2:]
        x = pad_to(x, round_up(h, 32), round_up(w, 32))
        with torch.no_grad():
            maps = enc(x); sc = br.scores(maps, q)
        sc = F.interpolate(sc, size=x.shape[-2:], mode="bilinear")[0, :, :h, :w]
        sc = F.interpolate(sc[None], size=m.shape, mode="bilinear")[0]
        pred = sc.argmax(0).numpy()
        for a, cid in enumerate(ids):
            sel = m == cid
            if sel.any():
                conf[a] += np.bincount(pred[sel], minlength=6)
    per = conf.diagonal() / conf.sum(1)
    res[k] = per
    print("top_k", k, "discrimination (mean per-class acc)", per.mean().round(3), dict(zip(novel, per.round(2))), "pixel acc", (conf.diagonal().sum()/conf.sum()).round(3))
