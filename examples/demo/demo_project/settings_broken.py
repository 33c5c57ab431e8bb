"""Deliberately broken settings module.

Importing it fails with ModuleNotFoundError (an ImportError subclass); used by
tests to check how start-up errors are reported.
"""

import does_not_exist_module  # noqa: F401
