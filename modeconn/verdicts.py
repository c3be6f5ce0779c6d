"""A claim's verdict from its parts, as every report here states it."""


def verdict(parts: list[bool]) -> str:
    """reproduced (every part holds), not reproduced (none does) or partly."""
    return "reproduced" if all(parts) else "not reproduced" if not any(parts) else "partly"
