"""fusionseg (hf: CLIP ViT-B/16 + paper preset) against CLIPSeg (clipseg-rd64-refined architecture), per image.

Both sides have random weights (speed only; nothing is downloaded) and run on the same CPU threads at the same
image size. fusionseg encodes the image once and segments all N names in one fusion pass, with the text
embeddings from its cache; CLIPSeg is run as its documentation shows: the image repeated once per prompt
(``pixel_values`` of N copies, ``input_ids`` of N prompts), so its ViT and text tower run N times. CLIPSeg
prompts are processed in chunks of ``--clipseg-chunk`` (memory); its time is the sum over chunks.

Times are medians of A/B interleaved repeats: fusionseg from the prepared tensor to the label map,
CLIPSeg from pixel_values + input_ids to sigmoid scores.

Usage: python benchmarks/infer_vs_clipseg.py [--classes 1,5,20,80] [--size 352] [--repeats 3] [--threads 2]
Targets: at 1 name fusionseg <= 1.3x CLIPSeg's time; at 20 names >= 10x faster.
"""
from __future__ import annotations

import tempfile
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
    ap.set_defaults(repeats=3)
    C.add_json_arg(ap, "infer_vs_clipseg")
    a = ap.parse_args()
    C.setup(a)
    counts = C.int_list(a.classes, "--classes", 1, 200)
    C.vit_side(a.size, "--size", 64, 1024)
    C.in_range(a.clipseg_chunk, "--clipseg-chunk", 1, 200)
    C.in_range(a.prompt_tokens, "--prompt-tokens", 3, 77)

    from fusionseg.segmenter import Prepared
    tmp = Path(tempfile.mkdtemp(prefix="fusionseg-bench-"))
    seg = C.vit_b16_paper_segmenter(tmp / "clip-vit-b16", a.size)
    clipseg = clipseg_model()
    torch.manual_seed(1)
    pix = torch.randn(1, 3, a.size, a.size)
    prep = Prepared(pix, (a.size, a.size), (a.size, a.size))
    vocab = [f"class {i}" for i in range(max(counts))]
    seg.text_embeddings(vocab)  # the text cache: names are encoded once, as in a session
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

        @torch.inference_mode()
        def peer():
            for s in range(0, n, a.clipseg_chunk):
                k = min(n, s + a.clipseg_chunk) - s
                out = clipseg(input_ids=ids[s:s + k], pixel_values=pix.expand(k, -1, -1, -1))
                out.logits.sigmoid()

        t = C.interleaved({"ours": ours, "clipseg": peer}, a.repeats if n <= 20 else max(1, a.repeats // 2))
        rows.append([n, f"{t['ours'] * 1000:.0f}", f"{t['clipseg'] * 1000:.0f}", f"{t['ours'] / t['clipseg']:.2f}x",
                     f"{t['clipseg'] / t['ours']:.1f}x"])
        print(f"  {n} names: fusionseg {t['ours'] * 1000:.0f} ms, CLIPSeg {t['clipseg'] * 1000:.0f} ms", flush=True)
    header = ["names", "fusionseg ms", "CLIPSeg ms", "fusionseg / CLIPSeg time", "speed-up"]
    print(C.table(header, rows))
    one = next((r for r in rows if r[0] == 1), None)
    twenty = next((r for r in rows if r[0] == 20), None)
    notes = []
    if one:
        notes.append(f"Target at 1 name, fusionseg <= 1.3x CLIPSeg's time: {one[3]}, "
                     f"{'met' if float(one[3][:-1]) <= 1.3 else 'NOT met'}.")
    if twenty:
        notes.append(f"Target at 20 names, >= 10x faster: {twenty[4]}, "
                     f"{'met' if float(twenty[4][:-1]) >= 10 else 'NOT met'}.")
    print("\n".join(notes))
    C.save_results(a.json, "infer_vs_clipseg",
                   f"one {a.size}x{a.size} image, fusionseg (hf: CLIP ViT-B/16 + paper preset, cached text) vs CLIPSeg "
                   f"(rd64-refined architecture, image repeated per prompt), random weights, {a.threads} threads, "
                   f"{a.repeats} repeats", [{"header": header, "rows": rows}], notes)


if __name__ == "__main__":
    main()
