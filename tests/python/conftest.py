"""pytest hooks for tests/python: prints the figures the tests measured.

Timings are printed, never asserted (a loaded CI machine must not fail a
test). A test records one with ``record_property("figure", text)``; the
report carries it to this process even from a pytest-xdist worker, and it is
printed after the run.
"""

FIGURES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        FIGURES.extend(
            value for name, value in report.user_properties if name == "figure"
        )


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
