"""The job's exit statuses: one per outcome (README, "Commands, exit statuses, dry runs")."""

OK = 0  # every item has exactly one current row for this config, none of them a retryable error
USAGE = 2  # bad command line, config, input, output or model: found before any work, nothing written
INCOMPLETE = 3  # the run ended but the output is not exactly one row per item: rerun to fill the gaps
FAILED = 4  # the run stopped on an unexpected error (details in the log file): rerun to resume
TOO_MANY_ERRORS = 5  # finished, but more items ended in error than output.max_error_rate allows
INFRASTRUCTURE = 6  # storage, disk or cluster failed (the run stopped, or items failed transiently): rerun
BUSY = 7  # another run holds this output's lease for the same config
INTERRUPTED = 130  # SIGINT (Ctrl-C): committed parts are kept, rerun to resume
TERMINATED = 143  # SIGTERM: likewise
