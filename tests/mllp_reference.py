"""The MLLP framing rules stated byte by byte: the model the decoder is checked against."""

from __future__ import annotations

EB = b"\x1c"


def reference(data: bytes, limit: int) -> tuple[list[bytes], bool]:
    """Byte-at-a-time statement of the framing rules: (frames, too_large)."""
    frames: list[bytes] = []
    buffer: bytearray | None = None
    for value in data:
        if value == 0x0B:
            if buffer is not None and len(buffer) - (buffer[-1:] == EB) > limit:
                return frames, True
            buffer = bytearray()
        elif buffer is None:
            continue
        elif value == 0x0D and buffer[-1:] == EB:
            frames.append(bytes(buffer[:-1]))
            buffer = None
        else:
            buffer.append(value)
            if len(buffer) - (buffer[-1:] == EB) > limit:
                return frames, True
    return frames, False
