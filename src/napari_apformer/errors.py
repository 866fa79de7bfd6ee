"""The one exception type for problems the user can fix: bad files, bad settings."""


class InputError(ValueError):
    """A message for the user, naming the file (if any) and the problem; no traceback needed."""

    def __init__(self, problem: str, source: object | None = None) -> None:
        self.problem, self.source = problem, source
        super().__init__(f"{source}: {problem}" if source is not None else problem)
