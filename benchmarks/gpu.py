"""GPU: ms per image for an hf: CLIP ViT-B/16 (random weights) + the paper preset at 512 px in fp32 and bf16,
and images/s at batch 16. Without CUDA it says so and exits 0 (nothing measured); CI never needs a GPU.

Usage: python benchmarks/gpu.py [--size 512] [--classes 20] [--batch 16] [--repeats 20]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C
import torch


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--size", type=int, default=512, help="image side in px (64..2048, a multiple of 16)")
    ap.add_argument("--classes", type=int, default=20, help="number of class names (1..1000)")
    ap.add_argument("--batch", type=int, default=16, help="batch for the images/s figure (1..256)")
    ap.set_defaults(repeats=20)
    C.add_json_arg(ap, "gpu")
    a = ap.parse_args()
    C.setup(a)
    C.vit_side(a.size, "--size", 64, 2048)
    C.in_range(a.classes, "--classes", 1, 1000)
    C.in_range(a.batch, "--batch", 1, 256)
    if not torch.cuda.is_available():
        print("gpu.py: skipped: CUDA is not available on this machine (nothing measured)")
        C.save_results(a.json, "gpu", settings(a), measured=False,
                       reason="CUDA is not available on the machine that ran it")
        return
    seg = C.vit_b16_paper_segmenter(Path(tempfile.mkdtemp(prefix="fusionseg-bench-")) / "clip-vit-b16", a.size)
    seg.model.to("cuda")
    seg.device = torch.device("cuda")
    names = [f"class {i}" for i in range(a.classes)]
    text = seg.text_embeddings(names)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for b in (1, a.batch):
            x = torch.randn(b, 3, a.size, a.size, device="cuda")

            @torch.inference_mode()
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    low = seg.model.head(seg.model.encode_image(x), text)
                    torch.nn.functional.interpolate(low.float(), size=(a.size, a.size), mode="bilinear").max(1)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.repeats
            rows.append([str(dtype).replace("torch.", ""), b, f"{dt / b * 1000:.2f}", f"{b / dt:.1f}"])
    print(f"{torch.cuda.get_device_name()}; image {a.size}x{a.size}; {a.classes} names; labels at full size")
    header = ["dtype", "batch", "ms per image", "images/s"]
    print(C.table(header, rows))
    C.save_results(a.json, "gpu", f"{torch.cuda.get_device_name()}, {settings(a)}", [{"header": header, "rows": rows}])


def settings(a) -> str:
    return (f"hf: CLIP ViT-B/16 + paper preset, random weights, image {a.size}x{a.size}, {a.classes} names, "
            f"labels at full size, batch 1 and {a.batch}, {a.repeats} repeats")


if __name__ == "__main__":
    main()
