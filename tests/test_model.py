import pytest
import torch

from fusionseg.model.fusioner import FusionHead, FusionerConfig, PRESETS

STRIDES, CHANNELS = (8, 16, 32, 32), (40, 112, 320, 1280)


def feats(b=2, size=320, channels=CHANNELS):
    return [torch.randn(b, c, size // s, size // s) for c, s in zip(channels, STRIDES)]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_shapes_through_every_layer(preset):
    cfg = FusionerConfig.from_preset(preset, STRIDES, CHANNELS, 384)
    head = FusionHead(cfg).eval()
    assert cfg.token_levels() == [1, 2, 3] and cfg.skip_levels() == [1, 0]
    v = feats()
    tok, grid = head.tokens(v)
    assert tok.shape == (2, 100, 112 + 320 + 1280) and grid == (10, 10)
    text = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    vt, ct = head.fusion(tok, text, grid)
    assert vt.shape == (2, 100, cfg.width) and ct.shape == (2, 5, cfg.width)
    with torch.no_grad():
        out = head(v, text)
        assert out.shape == (2, 5, 40, 40) and out.dtype == torch.float32
        assert cfg.output_stride == 8
        assert head(v, text, (320, 320)).shape == (2, 5, 320, 320)
        # cosine / temperature bounds the logits
        assert out.abs().max() <= (1 + head.head.bias.abs()) / 0.07 + 1e-3


def test_odd_sizes_and_many_classes():
    cfg = FusionerConfig.from_preset("tiny", STRIDES, CHANNELS, 384)
    head = FusionHead(cfg).eval()
    # 333 x 250 input padded to 352 x 256 by the caller; maps are ceil(H/s)
    v = [torch.randn(1, c, -(-256 // s), -(-352 // s)) for c, s in zip(CHANNELS, STRIDES)]
    with torch.no_grad():
        for n in (1, 1000):
            out = head(v, torch.randn(n, 384), (250, 333))
            assert out.shape == (1, n, 250, 333)
            assert torch.isfinite(out).all()


def test_fusion_mixes_modalities():
    """Changing one class name's embedding changes the visual tokens' output (and vice versa)."""
    torch.manual_seed(0)
    cfg = FusionerConfig.from_preset("tiny", STRIDES, CHANNELS, 384)
    head = FusionHead(cfg).eval()
    tok, grid = head.tokens(feats(1))
    t1 = torch.randn(3, 384)
    t2 = t1.clone()
    t2[1] = torch.randn(384)
    with torch.no_grad():
        v1, c1 = head.fusion(tok, t1, grid)
        v2, c2 = head.fusion(tok, t2, grid)
        assert (v1 - v2).abs().max() > 1e-4
        tok2 = tok.clone()
        tok2[0, 0] += torch.randn_like(tok2[0, 0])
        _, c3 = head.fusion(tok2, t1, grid)
        assert (c1 - c3).abs().max() > 1e-4


def test_no_fusion_ablation_does_not_mix():
    torch.manual_seed(0)
    cfg = FusionerConfig.from_preset("tiny", STRIDES, CHANNELS, 384, fusion=False)
    head = FusionHead(cfg).eval()
    v = feats(1)
    t1 = torch.randn(3, 384)
    t2 = t1.clone()
    t2[1] = torch.randn(384)
    with torch.no_grad():
        a, b = head(v, t1), head(v, t2)
    assert torch.allclose(a[:, [0, 2]], b[:, [0, 2]])  # other classes' scores untouched
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_padding_mask_makes_padded_classes_inert():
    torch.manual_seed(0)
    cfg = FusionerConfig.from_preset("tiny", STRIDES, CHANNELS, 384)
    head = FusionHead(cfg).eval()
    tok, grid = head.tokens(feats(1))
    t = torch.randn(1, 3, 384)
    pad = torch.tensor([[False, False, True]])
    with torch.no_grad():
        v1, _ = head.fusion(tok, t, grid, pad)
        t2 = t.clone()
        t2[0, 2] = torch.randn(384)
        v2, _ = head.fusion(tok, t2, grid, pad)
    assert torch.allclose(v1, v2, atol=1e-6)


def test_presets_params():
    small = FusionHead(FusionerConfig.from_preset("small", STRIDES, CHANNELS, 384))
    paper = FusionHead(FusionerConfig.from_preset("paper", STRIDES, CHANNELS, 384))
    n_small = sum(p.numel() for p in small.parameters())
    n_paper = sum(p.numel() for p in paper.parameters())
    assert 2e6 < n_small < 6e6
    assert n_paper > 35e6
    assert PRESETS["paper"]["width"] == 512 and PRESETS["paper"]["layers"] == 12
    with pytest.raises(ValueError, match="unknown preset"):
        FusionerConfig.from_preset("huge", STRIDES, CHANNELS, 384)


def test_fourier_positional_option_is_size_independent():
    cfg = FusionerConfig.from_preset("tiny", STRIDES, CHANNELS, 384, pos_embed="fourier")
    head = FusionHead(cfg).eval()
    with torch.no_grad():
        for size in (256, 320, 512):
            assert head(feats(1, size), torch.randn(2, 384)).shape == (1, 2, size // 8, size // 8)
