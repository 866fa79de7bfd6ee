"""The one exception type for problems the user can fix: bad files, bad settings."""


class InputError(ValueError):
    """A message for the user, naming the file (if any) and the problem; no traceback needed."""

    def __init__(self, problem: str, source: object | None = None) -> None:
        self.problem, self.source = problem, source
        super().__init__(f"{source}: {problem}" if source is not None else problem)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its type's name if it has none), for a message
    that names a cause without a traceback."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
