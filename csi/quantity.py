"""Kubernetes resource quantities (`512Mi`, `2G`, `1.5e9`), parsed as `resource.Quantity`
parses them and rounded up to whole bytes as its `Value()` is.

The grammar (k8s.io/apimachinery/pkg/api/resource/quantity.go):

    quantity  ::= signedNumber suffix
    suffix    ::= binarySI | decimalSI | decimalExponent
    binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei
    decimalSI ::= n | u | m | "" | k | M | G | T | P | E
    decimalExponent ::= ("e" | "E") signedNumber   (an integer)

Exact: the arithmetic is in fractions, so `0.1Gi` is 107374183 bytes (rounded up), as the
API server stores it, and never a float's neighbour.
"""

import fractions
import math
import re

_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_QUANTITY = re.compile(rf"({_NUMBER})(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
MAX_EXPONENT = 100  # the API server refuses larger quantities long before this


def parse(text: str) -> fractions.Fraction:
    """The exact value of a quantity; ValueError with the reason for anything else."""
    m = _QUANTITY.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 512Mi, 2G, 1.5e9)")
    number, suffix = m.group(1), m.group(2) or ""
    value = fractions.Fraction(number)
    if suffix in _BINARY:
        return value * 1024 ** _BINARY[suffix]
    exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:] or 0)
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"{text!r}: exponent out of range")
    return value * fractions.Fraction(10) ** exponent


def bytes_of(text: str) -> int:
    """A quantity of bytes: rounded up to a whole byte, as `Quantity.Value()` rounds."""
    return math.ceil(parse(text))


def human(n: int) -> str:
    """The shortest exact binary form (`512Mi`), else plain bytes."""
    for suffix, power in sorted(_BINARY.items(), key=lambda kv: -kv[1]):
        if n and n % 1024 ** power == 0:
            return f"{n // 1024 ** power}{suffix}"
    return str(n)
