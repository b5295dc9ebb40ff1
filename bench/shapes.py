"""Parameter lists shaped like real models (tensor shapes only; no model is built)."""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    """torchvision ResNet-50's 161 parameter tensors, 25.56M elements."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for i in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(width * 4, width, 1, 1), (width * 4,), (width * 4,)]
            if i == 0:
                shapes += [(width * 4, cin, 1, 1), (width * 4,), (width * 4,)]
            cin = width * 4
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter tensors, 124.4M elements (tied output embedding)."""
    d = 768
    shapes: list[tuple[int, ...]] = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llm_1b() -> list[tuple[int, ...]]:
    """A ~1.1B-parameter decoder (d=2048, 22 layers, 32k vocab, SwiGLU): GPU only."""
    d, ff, vocab = 2048, 5632, 32000
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(22):
        shapes += [(d,), (d, d), (d // 8, d), (d // 8, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    return shapes + [(d,), (vocab, d)]


def efficientnet_b0() -> list[tuple[int, ...]]:
    """An EfficientNet-B0-like list (MBConv with squeeze-excitation; 213 tensors, 5.29M elements):
    many tensors of 4-20 elements (SE biases), so raw offsets in a flat buffer are rarely 16-byte aligned."""
    shapes: list[tuple[int, ...]] = [(32, 3, 3, 3), (32,), (32,)]
    cin = 32
    for expand, k, _stride, cout, repeats in [
        (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
    ]:
        for _ in range(repeats):
            hid, sq = cin * expand, max(1, cin // 4)
            if expand != 1:
                shapes += [(hid, cin, 1, 1), (hid,), (hid,)]
            shapes += [(hid, 1, k, k), (hid,), (hid,)]
            shapes += [(sq, hid, 1, 1), (sq,), (hid, sq, 1, 1), (hid,)]
            shapes += [(cout, hid, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1280, 320, 1, 1), (1280,), (1280,), (1000, 1280), (1000,)]


def regnety_400mf() -> list[tuple[int, ...]]:
    """A RegNetY-400MF-like list (group width 8, squeeze-excitation at 1/4 of the block input)."""
    shapes: list[tuple[int, ...]] = [(32, 3, 3, 3), (32,), (32,)]
    cin = 32
    for width, depth in [(48, 1), (104, 3), (208, 6), (440, 6)]:
        for i in range(depth):
            se = max(1, round(cin * 0.25))
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, 8, 3, 3), (width,), (width,)]
            shapes += [(se, width, 1, 1), (se,), (width, se, 1, 1), (width,)]
            shapes += [(width, width, 1, 1), (width,), (width,)]
            if i == 0:
                shapes += [(width, cin, 1, 1), (width,), (width,)]
            cin = width
    return shapes + [(1000, 440), (1000,)]


def scaled(shapes: list[tuple[int, ...]], factor: int) -> list[tuple[int, ...]]:
    """Same tensor count, each dimension divided by ``factor`` (at least 1): for quick CPU runs."""
    return [tuple(max(1, s // factor) for s in shape) for shape in shapes]


def numel(shapes: list[tuple[int, ...]]) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


SETS = {
    "resnet50": resnet50,
    "gpt2-small": gpt2_small,
    "llm-1b": llm_1b,
    "efficientnet-b0": efficientnet_b0,
    "regnety-400mf": regnety_400mf,
}
