"""One exception type for bad input: the CLI prints its message as a single line and exits 2."""


class Krea2Error(Exception):
    """A user-facing error: the message names the problem and what to do about it."""


def read_text(path, what: str) -> str:
    """A user-supplied text file as str (UTF-8), or a one-line Krea2Error naming it: missing, a folder, unreadable,
    or not text (for example UTF-16 bytes 0xFF 0xFE, or a binary file)."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise Krea2Error(f"{what} {path} not found")
    if path.is_dir():
        raise Krea2Error(f"{what} {path} is a folder; pass the file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Krea2Error(f"{what} {path} is not UTF-8 text (byte {e.start}: 0x{e.object[e.start]:02X}); save it as "
                         "UTF-8") from None
    except OSError as e:
        raise Krea2Error(f"cannot read {what} {path}: {e.strerror or e}") from None
