import warnings

warnings.warn(
    "legacy.exporters is deprecated: use dumpdata", FutureWarning, stacklevel=2
)


def export() -> str:
    return "exported"
