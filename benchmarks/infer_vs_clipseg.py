"""fusionseg (hf: CLIP ViT-B/16 + paper preset) against CLIPSeg (clipseg-rd64-refined architecture), per image.

Both sides have random weights (speed only; nothing is downloaded) and run on the same CPU threads at the same
image size. fusionseg encodes the image once and segments all N names in one fusion pass, with the text
embeddings from its cache; CLIPSeg is run as its documentation shows: the image repeated once per prompt
(``pixel_values`` of N copies, ``input_ids`` of N prompts), so its ViT and text tower run N times. CLIPSeg
prompts are processed in chunks of ``--clipseg-chunk`` (memory); its time is the sum over chunks.

Times are medians of A/B interleaved repeats: fusionseg from the prepared tensor to the label map,
CLIPSeg from pixel_values + input_ids to sigmoid scores.

Usage: python benchmarks/infer_vs_clipseg.py [--classes 1,5,20,80] [--size 352] [--repeats 3] [--threads 2] [--compile]
Targets: at 1 name fusionseg <= 1.3x CLIPSeg's time; at 20 names >= 10x faster.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C
import torch


def clipseg_model():
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
    torch.manual_seed(0)
    cfg = CLIPSegConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=224),
        projection_dim=512, reduce_dim=64, extract_layers=[3, 6, 9], use_complex_transposed_convolution=True)
    return CLIPSegForImageSegmentation(cfg).eval()


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--classes", default="1,5,20,80", help="comma-separated name counts (1..200)")
    ap.add_argument("--size", type=int, default=352, help="image side in px (64..1024, a multiple of 16)")
    ap.add_argument("--clipseg-chunk", type=int, default=20, help="CLIPSeg prompts per forward (memory)")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="CLIPSeg prompt length in tokens incl. BOS/EOS")
    ap.add_argument("--compile", action="store_true",
                    help="also time fusionseg with Segmenter(compile=True) (torch.compile; compile time not counted, "
                         "reported apart)")
    ap.set_defaults(repeats=3)
    a = ap.parse_args()
    C.setup(a)
    counts = C.int_list(a.classes, "--classes", 1, 200)
    C.in_range(a.size, "--size", 64, 1024)
    if a.size % 16:
        C.fail(f"--size {a.size} must be a multiple of 16 (the ViT patch)")
    C.in_range(a.clipseg_chunk, "--clipseg-chunk", 1, 200)
    C.in_range(a.prompt_tokens, "--prompt-tokens", 3, 77)

    from fusionseg.segmenter import Prepared
    tmp = Path(tempfile.mkdtemp(prefix="fusionseg-bench-"))
    seg = C.vit_b16_paper_segmenter(tmp / "clip-vit-b16", a.size)
    segc = C.vit_b16_paper_segmenter(tmp / "clip-vit-b16", a.size, compile=True) if a.compile else None
    clipseg = clipseg_model()
    torch.manual_seed(1)
    pix = torch.randn(1, 3, a.size, a.size)
    prep = Prepared(pix, (a.size, a.size), (a.size, a.size))
    vocab = [f"class {i}" for i in range(max(counts))]
    seg.text_embeddings(vocab)  # the text cache: names are encoded once, as in a session
    if segc is not None:
        segc.text_embeddings(vocab)
        t0 = time.perf_counter()
        for n in counts:  # one compile per number of names (the class-token count is part of the shape)
            segc.predict(prep, vocab[:n])
        print(f"torch.compile: {time.perf_counter() - t0:.0f} s to compile for {len(counts)} name counts (not timed below)")
    ids_all = torch.randint(1, 49000, (max(counts), a.prompt_tokens))
    ids_all[:, 0], ids_all[:, -1] = 49406, 49407  # BOS ... EOS (EOS is the largest id: CLIP pools there)

    print(f"image {a.size}x{a.size}; {a.threads} threads; repeats {a.repeats}; torch {torch.__version__}")
    print(f"fusionseg: hf: CLIP ViT-B/16 + paper preset ({sum(p.numel() for p in seg.model.parameters()) / 1e6:.1f} M "
          f"parameters); CLIPSeg rd64-refined ({sum(p.numel() for p in clipseg.parameters()) / 1e6:.1f} M)")
    rows = []
    for n in counts:
        names = vocab[:n]
        ids = ids_all[:n]

        def ours():
            seg.predict(prep, names)

        def ours_compiled():
            segc.predict(prep, names)

        @torch.inference_mode()
        def peer():
            for s in range(0, n, a.clipseg_chunk):
                k = min(n, s + a.clipseg_chunk) - s
                out = clipseg(input_ids=ids[s:s + k], pixel_values=pix.expand(k, -1, -1, -1))
                out.logits.sigmoid()

        fns = {"ours": ours, "clipseg": peer}
        if segc is not None:
            fns["compiled"] = ours_compiled
        t = C.interleaved(fns, a.repeats if n <= 20 else max(1, a.repeats // 2))
        row = [n, f"{t['ours'] * 1000:.0f}", f"{t['clipseg'] * 1000:.0f}", f"{t['ours'] / t['clipseg']:.2f}x",
               f"{t['clipseg'] / t['ours']:.1f}x"]
        if segc is not None:
            row += [f"{t['compiled'] * 1000:.0f}", f"{t['compiled'] / t['clipseg']:.2f}x", f"{t['clipseg'] / t['compiled']:.1f}x"]
        rows.append(row)
        print(f"  {n} names: fusionseg {t['ours'] * 1000:.0f} ms, CLIPSeg {t['clipseg'] * 1000:.0f} ms"
              + (f", fusionseg compiled {t['compiled'] * 1000:.0f} ms" if segc is not None else ""), flush=True)
    head = ["names", "fusionseg ms", "CLIPSeg ms", "fusionseg / CLIPSeg time", "speed-up"]
    if segc is not None:
        head += ["compiled ms", "compiled / CLIPSeg time", "compiled speed-up"]
    print(C.table(head, rows))
    one = next((r for r in rows if r[0] == 1), None)
    twenty = next((r for r in rows if r[0] == 20), None)
    for label, k in [("eager", 3)] + ([("compiled", 6)] if segc is not None else []):
        if one:
            print(f"target 1 name ({label}): fusionseg <= 1.3x CLIPSeg time: {one[k]} -> "
                  f"{'met' if float(one[k][:-1]) <= 1.3 else 'NOT met'}")
        if twenty:
            print(f"target 20 names ({label}): >= 10x faster: {twenty[k + 1]} -> "
                  f"{'met' if float(twenty[k + 1][:-1]) >= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
