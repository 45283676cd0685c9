"""The one exception type for problems a user can fix (bad parameter, wrong run ID, bad file).

Steps print a StepError as one clear line and exit 2, without a traceback; anything else is a bug
and keeps its traceback. Either way the step's MLflow run ends FAILED.
"""


class StepError(Exception):
    """A problem the user can fix; the message names it and says how."""
