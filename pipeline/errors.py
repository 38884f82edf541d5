class UserError(Exception):
    """An error the user caused (bad input, bad config): the CLI prints its message and exits with 2."""


class GateFailed(Exception):
    """A quality gate failed (the results are written): the CLI prints the message and exits with 1."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite (the last good weights are saved): the CLI prints the message and exits with 1."""
