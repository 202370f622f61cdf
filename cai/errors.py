"""User-facing input errors.

An InputError carries one line per problem, each naming the file (and line/column or
field path) and what to do. The CLI prints them and exits with code 2. Nothing here
knows about the CLI or any file format.
"""


class InputError(Exception):
    """Bad input from the user: one clear line per problem, raised before expensive work."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
