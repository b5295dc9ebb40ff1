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


SETS = {"resnet50": resnet50, "gpt2-small": gpt2_small, "llm-1b": llm_1b}
