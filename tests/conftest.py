pytest_plugins = ["tests.fixtures.sshd"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than 20 s")
