"""Old code that warns when it is imported, as deprecated modules do: a
module a system check imports (legacy.formats) and one a command imports
(legacy.exporters), plus, in the settings, a print and a warning of their
own, and in ready() a log line; and a scratch directory made at start-up
that removes itself at exit.
Installed only when FIDELITY_LEGACY is set, for the fidelity test's
warning cases: a fresh `manage.py` prints these warnings in every run that
imports the module, and so must a job forked from a worker that imported
it long before."""
