"""The ``--multiscale`` list and the CPU runtime names: what the command line parses, without torch.

Defined here, in a module that imports nothing heavy, so that ``raml test -h`` or ``raml extract -ms ...`` parse
their flags without importing torch; :mod:`raml.retrieval.extract` imports them from here.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Sequence

#: One scale: the image as the evaluation transform gives it.
SINGLE_SCALE: tuple[float, ...] = (1.0,)

#: How an fp32 forward runs on the CPU: ``auto`` (onnxruntime where it works, else torch), ``onnxruntime``
#: (error when it does not) or ``torch`` (PyTorch's eager forward).
CPU_RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "torch")


_MAX_SCALES_TEXT = 1000
_BINARY_OPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _scale_value(node: ast.AST, text: str) -> float:
    """The value of one scale expression: numbers combined with ``+ - * / **`` and unary signs."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_scale_value(node.operand, text))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _scale_value(node.left, text), _scale_value(node.right, text)
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError(f"{ast.unparse(node)!r} in {text!r} divides by zero") from None
        except OverflowError:
            raise ValueError(f"{ast.unparse(node)!r} in {text!r} is too large") from None
        if not isinstance(value, float):  # a negative base to a fractional power is complex
            raise ValueError(f"{ast.unparse(node)!r} in {text!r} is not a real number")
        return value
    raise ValueError(
        f"{ast.unparse(node)!r} in {text!r} is not allowed: a scale is a number or arithmetic on numbers "
        "with + - * / ** (e.g. 1/2**(1/2))"
    )


def validate_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Check that ``scales`` is a non-empty list of positive finite numbers; return it as a tuple of floats."""
    if isinstance(scales, str | bytes) or not isinstance(scales, Sequence):
        raise ValueError(f"scales must be a sequence of numbers such as (1, 0.5), got {scales!r}")
    values = tuple(float(s) for s in scales)
    if not values:
        raise ValueError("scales must hold at least one scale, e.g. (1,)")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"every scale must be a positive finite number, got {bad[0]!r} in {list(values)}")
    return values


def check_scaled_size(scales: Sequence[float], image_size: int, max_pixels: int) -> None:
    """Refuse a scale that rescales the ``image_size x image_size`` evaluation images to more than ``max_pixels``
    pixels each (the limit of the images themselves, :data:`raml.data.image_limits.DEFAULT_MAX_PIXELS`).

    The rescaled side is ``floor(image_size * scale)``, as :func:`torch.nn.functional.interpolate` makes it.
    Scales up to 1 never enlarge an image and are not checked here.

    Raises:
        ValueError: naming the scale, the size it asks for, the limit and the largest scale that fits.
    """
    for scale in validate_scales(scales):
        if scale <= 1.0:
            continue
        side = math.floor(image_size * scale)
        if side * side > max_pixels:
            largest = math.floor(math.isqrt(max_pixels) / image_size * 1000) / 1000
            raise ValueError(
                f"scale {scale:g} rescales the {image_size}x{image_size} images of image size {image_size} to "
                f"{side}x{side} = {side * side} pixels each, over the limit of {max_pixels} pixels; at image size "
                f"{image_size} use scales of at most {largest:g}"
            )


def parse_scales(text: str) -> tuple[float, ...]:
    """Parse the reference's ``--multiscale`` value, e.g. ``'[1, 1/2**(1/2), 1/2]'``, without evaluating it.

    Accepted: a list or tuple (brackets optional) of numbers or arithmetic on numbers with ``+ - * / **``
    and unary signs. Every scale must be positive and finite.

    Raises:
        ValueError: on anything else (names, calls, nested lists, strings, empty lists, non-positive or
            non-finite scales), naming the part that was refused.
    """
    if not isinstance(text, str):
        raise ValueError(f"scales must be given as text such as '[1, 1/2]', got {text!r}")
    if len(text) > _MAX_SCALES_TEXT:
        raise ValueError(f"the list of scales is longer than {_MAX_SCALES_TEXT} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"{text!r} is not a list of scales such as '[1, 1/2**(1/2), 1/2]' ({error})") from None
    body = tree.body
    items = body.elts if isinstance(body, ast.List | ast.Tuple) else [body]
    try:
        values = [_scale_value(item, text) for item in items]
    except RecursionError:
        raise ValueError(f"{text!r} is nested too deeply") from None
    return validate_scales(values)
