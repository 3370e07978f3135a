"""The one exception type stages raise for bad input; the CLI prints it as one line.

A `SpeculatorsError` always names the file (or key) at fault and what is wrong with it.
"""


class SpeculatorsError(Exception):
    """Bad input or environment: reported to the user as a single line, exit status 1."""

    def __init__(self, where, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
