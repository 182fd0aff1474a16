"""How much of a weight the torch paths make at a time.

Quantising a weight, dequantising it, or upcasting a half-precision one for an fp32 matmul is
done `CHUNK` elements at a time (4M: 16 MB of fp32), a block of whole rows where the result is
used by rows, so the scratch is a block's, not the weight's (a 7B model's MLP weight would be
271 MB of fp32 at every such step). `nf4`, `int8` and `frozen_linear` each read CHUNK through their
own module's name, which the tests shrink to cross block edges on small weights.
"""

CHUNK = 1 << 22  # elements


def row_blocks(n: int, k: int, chunk: int = CHUNK, align: int = 1) -> list[slice]:
    """Slices of the rows of an [n, k] weight, about `chunk` elements each, every block a
    multiple of `align` rows long (the last may be shorter), at least one row."""
    step = max(align, chunk // max(1, k) // align * align)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
