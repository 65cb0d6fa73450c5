"""pytest setup: `common` (importable through pytest.ini's pythonpath, or installed by make setup) imported before any kernel is defined
(without a GPU that switches Triton to its CPU interpreter)."""


import common


def pytest_report_header(config):
    return common.banner()
