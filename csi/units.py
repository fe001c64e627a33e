"""Byte counts as people read them: the one formatter behind every size strata prints (`strata
pull` progress, `ls`, `df`, `gc`, the demo, health messages).

Why IEC (KiB, MiB, GiB: powers of 1024) and not Docker's units: `docker system df`,
`docker images` and `docker pull`'s progress format sizes with go-units' `HumanSize`, which is
SI (powers of 1000, written `kB`, `MB`, `GB`, four significant digits, no space: `1.234GB`).
The sizes strata prints are read beside numbers that are powers of 1024: a volume's
`sizeLimit` is a Kubernetes quantity, written `512Mi` or `1Gi` in pod specs; filesystems,
quotas and `du -h`/`df -h` count in 1024-byte units. In SI a `1Gi` limit would read
"1.1 GB" and a full 1Gi volume "1.07 GB": neither matches what the pod spec says. The IEC
names leave no doubt which base is meant (`kB` vs `KB` vs `KiB`), so strata uses them
everywhere, one decimal, a space before the unit (`21.3 MiB`), as SI/IEC style asks.

A size limit is not a measured size but the Kubernetes quantity a pod spec wrote: it is
echoed in that notation (`8Mi`, quantity.human), which is IEC too.
"""

UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: float) -> str:
    """`512 B`, `1.0 KiB`, `21.3 MiB`, `4.0 GiB`: bytes below 1 KiB whole, else one decimal
    in the largest unit that keeps the number below 1024 (EiB at most). Negative counts
    (a difference) keep their sign."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in UNITS:
        n /= 1024
        # Rounded as printed: 1023.96 KiB shows as "1.0 MiB", never "1024.0 KiB".
        if abs(round(n, 1)) < 1024 or unit == UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
