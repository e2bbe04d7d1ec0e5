"""Expected failures (bad input, a gate or a reviewer saying no) end a flow run Failed with their own lines in the
log and the state's message, never a Python traceback: the UI shows what `ftpipe validate` would print.
Anything else is a bug or an outage and keeps Prefect's traceback (and retries)."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_FAILED = 0, 1, 2, 3


def exit_code_for(error: object) -> int:
    """The command line's exit code for a run's error: 1 a gate or reviewer said no, 2 bad input, 3 anything else."""
    from data_prep.formats import RowError
    from data_prep.readers import DataError
    from evaluation.endpoints import EndpointRefused
    from evaluation.gates import GateRejected
    from evaluation.monitor import MonitoringError
    from recipes import RecipeError
    from training.backends import BackendError
    from training.families import UnsupportedFamilyError
    from training.launch import LaunchError
    from training.models import ModelLoadError, refused_input
    from training.tokenize import MaskingError

    from flows.approval import PromotionRefused

    if isinstance(error, (GateRejected, PromotionRefused)):
        return EXIT_GATE
    if isinstance(error, BaseException) and refused_input(error) is not None:  # a pickle refused, a template that fails
        return EXIT_INPUT
    if isinstance(error, (RecipeError, DataError, RowError, ModelLoadError, MaskingError, UnsupportedFamilyError, BackendError,
                          LaunchError, EndpointRefused, MonitoringError)):
        return EXIT_INPUT
    return EXIT_FAILED


def expected(error: BaseException) -> bool:
    return exit_code_for(error) in (EXIT_GATE, EXIT_INPUT)


def error_lines(error: BaseException) -> list[str]:
    """The error's own lines (a RecipeError has one per field), each a complete sentence for the log."""
    return list(getattr(error, "lines", None) or str(error).splitlines() or [type(error).__name__])


def failure_message(error: BaseException) -> str:
    kind = "rejected" if exit_code_for(error) == EXIT_GATE else "invalid input"
    return f"{kind}: " + "; ".join(error_lines(error))


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a flow's function: an expected error becomes a Failed state carrying the error (so a caller's `.result()`
    still raises it, and `ftpipe run` maps it to its exit code), its lines logged without a traceback; any other error
    propagates as before. Not for tasks: a task's returned Failed state reaches its caller as None, not as the error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if not expected(error):
                raise
            from prefect import get_run_logger
            from prefect.states import Failed

            logger = get_run_logger()
            for line in error_lines(error):
                logger.error("%s", line)
            return Failed(message=failure_message(error), data=error)

    return wrapper


class _DropExpectedTracebacks(logging.Filter):
    """Prefect logs a task's exception with its traceback ("Task run failed with exception"), and its engine, running a
    deployment's flow run in its own process, logs the run's exception once more when the run ends ("Engine execution
    exited with unexpected exception"). For an expected failure the task's line keeps its message without the
    traceback, and the engine's record, which would call it unexpected, is dropped; any other error keeps both."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not expected(error):
            return True
        if str(record.msg).startswith("Engine execution exited"):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """Install the filter on the flow-run and task-run loggers of this process (once; the flow modules call it on
    import)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedTracebacks) for f in logger.filters):
            logger.addFilter(_DropExpectedTracebacks())
