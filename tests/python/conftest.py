"""pytest hooks for tests/python: prints the figures the tests measured.

Timings are printed, never asserted (a loaded CI machine must not fail a
test); harness.FIGURES collects them and this prints them after the run.
"""

from harness import FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
